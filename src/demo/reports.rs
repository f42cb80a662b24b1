//! The guest's own reports, as `vigil vmm --report-file` writes them: one line per
//! report, `<monotonic_ns> <token> <vcpu> <counter>`.
//!
//! They are the ground truth of where and when a VM ran: the demo reads the counter a
//! restored guest resumed from, and the tests prove from them that a VM never ran on two
//! hosts at once ([`check_runs`]).
//!
//! A line being appended while the file is read may be incomplete: a last line without
//! its newline is left for the next read. Anything else that is not a report is an
//! error naming the file, line, byte offset and field.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::limits::MAX_REPORT_FILE_BYTES;

/// One guest report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// CLOCK_MONOTONIC nanoseconds when the VMM saw the report.
    pub at_ns: u64,
    /// The fencing token the VMM ran with.
    pub token: u64,
    pub vcpu: u32,
    pub counter: u64,
}

/// A report file that could not be read or decoded, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportError {
    pub file: PathBuf,
    /// 1-based line (0 when the error is about the whole file).
    pub line: usize,
    pub offset: u64,
    pub what: String,
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.what)
        } else {
            write!(
                f,
                "{}:{} (byte offset {}): {}",
                self.file.display(),
                self.line,
                self.offset,
                self.what
            )
        }
    }
}

impl std::error::Error for ReportError {}

const FIELDS: [&str; 4] = ["monotonic_ns", "token", "vcpu", "counter"];

/// Decodes report lines; `file` only names the source in errors.
pub fn parse(bytes: &[u8], file: &Path) -> Result<Vec<Report>, ReportError> {
    let mut reports = Vec::new();
    let mut offset = 0usize;
    let mut line_number = 0usize;
    while offset < bytes.len() {
        let Some(length) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            break; // an incomplete last line: still being written
        };
        line_number += 1;
        let line = &bytes[offset..offset + length];
        let error = |what: String| ReportError {
            file: file.to_path_buf(),
            line: line_number,
            offset: offset as u64,
            what,
        };
        let text =
            std::str::from_utf8(line).map_err(|_| error("the line is not UTF-8".to_string()))?;
        let mut values = [0u64; 4];
        let mut fields = text.split(' ');
        for (value, name) in values.iter_mut().zip(FIELDS) {
            let field = fields
                .next()
                .ok_or_else(|| error(format!("field '{name}' is missing")))?;
            *value = field.parse().map_err(|_| {
                error(format!(
                    "field '{name}': {field:?} is not an unsigned integer"
                ))
            })?;
        }
        if fields.next().is_some() {
            return Err(error(format!(
                "more than {} fields (expected {})",
                FIELDS.len(),
                FIELDS.join(" ")
            )));
        }
        let vcpu = u32::try_from(values[2])
            .map_err(|_| error(format!("field 'vcpu': {} is out of range", values[2])))?;
        reports.push(Report {
            at_ns: values[0],
            token: values[1],
            vcpu,
            counter: values[3],
        });
        offset += length + 1;
    }
    Ok(reports)
}

/// Reads a report file; a file that does not exist yet has no reports.
pub fn read(path: &Path) -> Result<Vec<Report>, ReportError> {
    let error = |what: String| ReportError {
        file: path.to_path_buf(),
        line: 0,
        offset: 0,
        what,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(error(format!("cannot read: {e}"))),
    };
    if bytes.len() as u64 > MAX_REPORT_FILE_BYTES {
        return Err(error(format!(
            "{} bytes is more than the {MAX_REPORT_FILE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    parse(&bytes, path)
}

/// The reports of one VM by one VMM: one host, one fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub host: u64,
    pub token: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// vCPU 0's counter in the run's first and last report (None if vCPU 0 never reported).
    pub first_counter: Option<u64>,
    pub last_counter: Option<u64>,
    pub reports: usize,
}

/// Groups one VM's reports from several hosts into runs, ordered by token.
pub fn runs(by_host: &[(u64, Vec<Report>)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (host, reports) in by_host {
        for r in reports {
            let run = match runs
                .iter_mut()
                .find(|run| run.host == *host && run.token == r.token)
            {
                Some(run) => run,
                None => {
                    runs.push(Run {
                        host: *host,
                        token: r.token,
                        first_ns: r.at_ns,
                        last_ns: r.at_ns,
                        first_counter: None,
                        last_counter: None,
                        reports: 0,
                    });
                    runs.last_mut().expect("just pushed")
                }
            };
            run.first_ns = run.first_ns.min(r.at_ns);
            run.last_ns = run.last_ns.max(r.at_ns);
            run.reports += 1;
            if r.vcpu == 0 {
                if run.first_counter.is_none() {
                    run.first_counter = Some(r.counter);
                }
                run.last_counter = Some(r.counter);
            }
        }
    }
    runs.sort_by_key(|run| (run.token, run.first_ns));
    runs
}

/// The split-brain check over one VM's runs: every run has its own token, a run with a
/// higher token starts only after every earlier run's last report (no report of an
/// older placement after the first report of a newer one), and within each host's file
/// every vCPU's counter only grows.
pub fn check_runs(by_host: &[(u64, Vec<Report>)]) -> Result<Vec<Run>, String> {
    for (host, reports) in by_host {
        let mut last: Vec<(u32, u64, u64)> = Vec::new(); // (vcpu, token, counter)
        for r in reports {
            match last
                .iter_mut()
                .find(|(v, t, _)| *v == r.vcpu && *t == r.token)
            {
                Some((_, _, counter)) => {
                    if r.counter <= *counter {
                        return Err(format!(
                            "host {host}, token {}, vcpu {}: counter went from {} to {} (at {} ns)",
                            r.token, r.vcpu, counter, r.counter, r.at_ns
                        ));
                    }
                    *counter = r.counter;
                }
                None => last.push((r.vcpu, r.token, r.counter)),
            }
        }
    }
    let runs = runs(by_host);
    for pair in runs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.token == b.token {
            return Err(format!(
                "token {} ran on two hosts: {} ({} reports) and {} ({} reports)",
                a.token, a.host, a.reports, b.host, b.reports
            ));
        }
    }
    for (i, later) in runs.iter().enumerate() {
        for earlier in &runs[..i] {
            if earlier.last_ns >= later.first_ns {
                return Err(format!(
                    "overlap: host {} (token {}) reported at {} ns, after host {} (token {}) \
                     first reported at {} ns ({:.3} ms later)",
                    earlier.host,
                    earlier.token,
                    earlier.last_ns,
                    later.host,
                    later.token,
                    later.first_ns,
                    (earlier.last_ns - later.first_ns) as f64 / 1e6
                ));
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(at_ns: u64, token: u64, counter: u64) -> Report {
        Report {
            at_ns,
            token,
            vcpu: 0,
            counter,
        }
    }

    #[test]
    fn parses_lines_and_leaves_an_incomplete_last_line() {
        let text = b"100 7 0 1\n110 7 0 2\n120 7 1 5\n130 7 0";
        let reports = parse(text, Path::new("reports.log")).unwrap();
        assert_eq!(reports.len(), 3);
        assert_eq!(reports[1], r(110, 7, 2));
        assert_eq!(reports[2].vcpu, 1);
        assert!(parse(b"", Path::new("x")).unwrap().is_empty());
    }

    #[test]
    fn names_file_line_offset_and_field_of_garbage() {
        let cases: [(&[u8], usize, u64, &str); 6] = [
            (b"100 7 0 1\n100 7 x 2\n", 2, 10, "field 'vcpu': \"x\""),
            (b"100 7 0\n", 1, 0, "field 'counter' is missing"),
            (b"100 7 0 1 9\n", 1, 0, "more than 4 fields"),
            (b"1 2 3 4\n-5 7 0 1\n", 2, 8, "field 'monotonic_ns'"),
            (b"1 2 3 4\n\xff\n", 2, 8, "not UTF-8"),
            (b"1 2 99999999999 4\n", 1, 0, "out of range"),
        ];
        for (bytes, line, offset, needle) in cases {
            let e = parse(bytes, Path::new("/d/reports.log")).unwrap_err();
            assert_eq!((e.line, e.offset), (line, offset), "{e}");
            let shown = e.to_string();
            assert!(shown.contains(needle), "{shown} lacks {needle}");
            assert!(shown.starts_with("/d/reports.log:"), "{shown}");
        }
    }

    #[test]
    fn a_missing_file_has_no_reports() {
        let path = Path::new("/nonexistent-vigil-dir/reports.log");
        assert!(read(path).unwrap().is_empty());
    }

    #[test]
    fn runs_in_token_order_that_do_not_overlap_pass() {
        let old = (1, vec![r(100, 5, 1), r(110, 5, 2), r(120, 5, 3)]);
        let new = (2, vec![r(300, 9, 2), r(310, 9, 3)]);
        let runs = check_runs(&[new.clone(), old.clone()]).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].host, runs[0].token), (1, 5));
        assert_eq!(
            (runs[0].first_counter, runs[0].last_counter),
            (Some(1), Some(3))
        );
        assert_eq!((runs[1].host, runs[1].first_counter), (2, Some(2)));
    }

    #[test]
    fn an_old_report_after_the_new_hosts_first_is_an_overlap() {
        let old = (1, vec![r(100, 5, 1), r(305, 5, 2)]);
        let new = (2, vec![r(300, 9, 2), r(310, 9, 3)]);
        let e = check_runs(&[old, new]).unwrap_err();
        assert!(e.contains("overlap: host 1 (token 5)"), "{e}");
    }

    #[test]
    fn one_token_on_two_hosts_or_a_counter_going_back_is_caught() {
        let a = (1, vec![r(100, 5, 1)]);
        let b = (2, vec![r(300, 5, 2)]);
        let e = check_runs(&[a, b]).unwrap_err();
        assert!(e.contains("token 5 ran on two hosts"), "{e}");
        let back = (1, vec![r(100, 5, 4), r(110, 5, 4)]);
        let e = check_runs(&[back]).unwrap_err();
        assert!(e.contains("counter went from 4 to 4"), "{e}");
    }

    #[test]
    fn a_restarted_agent_keeps_one_run() {
        // Re-adoption keeps the token: the same run continues in the same file.
        let host = (3, vec![r(100, 5, 1), r(110, 5, 2), r(900, 5, 80)]);
        let runs = check_runs(&[host]).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].reports, 3);
    }
}
