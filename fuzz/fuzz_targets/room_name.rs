//! Room names from clients (subscribe, publish, history, room tokens) into
//! `RoomId::parse` and the grant patterns that match them: a name it
//! accepts is 1 to 128 characters of `A-Z a-z 0-9 _ - :` (never a NATS
//! wildcard or subject separator), and matching any pattern against any
//! name terminates without a panic.
#![no_main]
use gateway::auth::grants::Pattern;
use gateway::model::RoomId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(room) = RoomId::parse(text) {
        let s = room.as_str();
        assert!(!s.is_empty() && s.len() <= RoomId::MAX_LEN);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b)));
    }
    // The input split in two: a grant pattern and a room name.
    let (pattern, name) = text.split_once('\n').unwrap_or((text, text));
    let p = Pattern::new(pattern);
    let hit = p.matches(name);
    if !pattern.contains('*') {
        assert_eq!(hit, pattern == name);
    }
});
