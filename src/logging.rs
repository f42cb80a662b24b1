//! A small stderr logger behind the `log` facade: no threads, no allocation beyond what
//! formatting needs, one `write` per line so lines from different processes do not mix.

use std::io::Write;

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ms = monotonic_ms();
        let line = format!(
            "{:>10}.{:03} {:<5} {}: {}\n",
            ms / 1000,
            ms % 1000,
            record.level(),
            record.target(),
            record.args()
        );
        // One write per line; a failed write to stderr has nowhere to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Milliseconds of CLOCK_MONOTONIC, for log timestamps (the wall clock is not trusted).
fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Installs the logger once. The level comes from `VIGIL_LOG` (error, warn, info,
/// debug, trace), `info` by default. Later calls are no-ops.
pub fn init() {
    let level = std::env::var("VIGIL_LOG")
        .ok()
        .and_then(|s| s.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// A budget of log lines per second for messages that hostile input can trigger at will
/// (refused connections, bad handshakes, the control access log): beyond it lines are
/// only counted, and the count is logged once the next second starts. A flood of bad
/// input then costs a counter increment, not a write to stderr.
pub struct RateLimit {
    per_second: u32,
    window_ms: u64,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            window_ms: 0,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now; `what` names the lines in the note about
    /// suppressed ones.
    pub fn allow(&mut self, what: &str) -> bool {
        let now = monotonic_ms();
        if now.saturating_sub(self.window_ms) >= 1000 {
            if self.suppressed > 0 {
                log::warn!("{} more {what} lines suppressed", self.suppressed);
            }
            self.window_ms = now;
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}
