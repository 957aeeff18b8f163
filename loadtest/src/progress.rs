//! A one-line progress display on stderr for long phases (connecting
//! thousands of clients, load steps). Silent when stderr is not a terminal,
//! so logs and CI output stay clean.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    shown: bool,
    last: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let shown = std::io::stderr().is_terminal() && std::env::var_os("LOADTEST_NO_PROGRESS").is_none();
        Self {
            label: label.into(),
            total,
            shown,
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    /// Redraws at most 5 times a second.
    pub fn set(&mut self, done: u64, note: &str) {
        if !self.shown || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let width = 30u64;
        let filled = (done.min(self.total) * width).checked_div(self.total).unwrap_or(0) as usize;
        let bar: String = "#".repeat(filled) + &"-".repeat(width as usize - filled);
        let _ = write!(
            std::io::stderr(),
            "\r{} [{bar}] {done}/{} {note}\x1b[K",
            self.label,
            self.total
        );
    }

    pub fn finish(&mut self) {
        if self.shown {
            let _ = writeln!(std::io::stderr(), "\r\x1b[K{} done", self.label);
        }
    }
}
