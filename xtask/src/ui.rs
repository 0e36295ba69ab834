//! Progress lines: every long step says what it is doing and how long it took.

use std::sync::OnceLock;
use std::time::Instant;

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Starts the process-wide clock (call once at the top of `main`).
pub fn start_clock() {
    let _ = started();
}

/// Seconds since the clock started, for the left column of progress lines.
pub fn elapsed_secs() -> f64 {
    started().elapsed().as_secs_f64()
}

/// Prints one progress line, prefixed with the total elapsed time.
pub fn line(msg: impl AsRef<str>) {
    eprintln!("[{:>7.1}s] {}", elapsed_secs(), msg.as_ref());
}

/// A named step: announced when created, closed with `done` or `skip`.
pub struct Step {
    name: String,
    start: Instant,
}

impl Step {
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        line(format!("==> {name}"));
        Step {
            name,
            start: Instant::now(),
        }
    }

    pub fn done(self) {
        line(format!(
            "    ok   {} ({:.1}s)",
            self.name,
            self.start.elapsed().as_secs_f64()
        ));
    }

    pub fn skip(self, why: impl AsRef<str>) {
        line(format!("    skip {}: {}", self.name, why.as_ref()));
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}
