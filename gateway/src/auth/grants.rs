//! Room grants: which rooms a connection may subscribe to and publish to.
//!
//! Owns the room-name [`Pattern`] (`*` matches any run of room characters),
//! [`Grants`] and how a token's rooms claim becomes grants (`grants_from`,
//! looked up by dotted path with `claim_at`).
//!
//! Does not own token verification or the defaults applied when a token has
//! no rooms claim (both in `auth`), nor room-name validation (`rooms`).
//!
//! Pure data and functions: no I/O, no shared state.

use serde_json::Value;

/// A room-name pattern: `*` matches any run of room characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

impl Pattern {
    pub fn new(p: &str) -> Self {
        Self(p.into())
    }

    pub fn matches(&self, room: &str) -> bool {
        glob(self.0.as_bytes(), room.as_bytes())
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with backtracking to the last `*`.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// What a connection may do with rooms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub subscribe: Vec<Pattern>,
    pub publish: Vec<Pattern>,
}

impl Grants {
    pub fn can_subscribe(&self, room: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(room))
    }

    pub fn can_publish(&self, room: &str) -> bool {
        self.publish.iter().any(|p| p.matches(room))
    }
}

/// A rooms claim that is neither a list of patterns nor `{"sub":[..],"pub":[..]}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedGrants;

/// The value at a dotted claim path (`realm_access.chat_rooms`).
pub(crate) fn claim_at<'a>(claims: &'a serde_json::Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for seg in rest {
        v = v.get(seg)?;
    }
    Some(v)
}

/// Grants from a rooms claim: `{"sub":[...],"pub":[...]}`, or a plain list of
/// patterns, which grants subscribing only.
pub(crate) fn grants_from(v: &Value) -> Result<Grants, MalformedGrants> {
    fn patterns(v: Option<&Value>) -> Result<Vec<Pattern>, MalformedGrants> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| p.as_str().map(Pattern::new).ok_or(MalformedGrants))
                .collect(),
            Some(_) => Err(MalformedGrants),
        }
    }
    match v {
        Value::Object(o) => Ok(Grants {
            subscribe: patterns(o.get("sub"))?,
            publish: patterns(o.get("pub"))?,
        }),
        Value::Array(_) => Ok(Grants {
            subscribe: patterns(Some(v))?,
            publish: Vec::new(),
        }),
        _ => Err(MalformedGrants),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = Pattern::new("team-*");
        assert!(p.matches("team-7") && p.matches("team-") && !p.matches("team") && !p.matches("xteam-1"));
        assert!(Pattern::new("*").matches("anything:at_all"));
        assert!(Pattern::new("a*b*c").matches("aXXbYYc") && !Pattern::new("a*b*c").matches("aXXbYY"));
        assert!(Pattern::new("general").matches("general") && !Pattern::new("general").matches("general2"));
    }
}
