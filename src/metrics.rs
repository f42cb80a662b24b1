//! Metrics for `GET /metrics`, in Prometheus' text format.
//!
//! Counters, gauges and latency histograms with fixed buckets: recording never
//! allocates, and rendering writes into a caller's buffer. Histograms keep their bounds
//! in microseconds, from 10 us to 10 s, roughly three buckets per decade, which covers an
//! fsync on NVMe and a failover alike.

use std::fmt::Write;

/// Upper bounds (inclusive) of the histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram: counts per bucket, plus the sum and count of all samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// `buckets[i]` counts samples in `(LATENCY_BUCKETS_US[i-1], LATENCY_BUCKETS_US[i]]`;
    /// the last slot counts samples above every bound.
    buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: u64,
    count: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record_us(&mut self, micros: u64) {
        let slot = LATENCY_BUCKETS_US.partition_point(|&bound| bound < micros);
        self.buckets[slot] += 1;
        self.sum_us = self.sum_us.saturating_add(micros);
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The bucket bound below which at least `quantile` of the samples fall (an upper
    /// estimate), or None without samples; `u64::MAX` when it is past the last bound.
    pub fn quantile_upper_bound_us(&self, quantile: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let wanted = (quantile.clamp(0.0, 1.0) * self.count as f64)
            .ceil()
            .max(1.0) as u64;
        let mut seen = 0;
        for (slot, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return Some(LATENCY_BUCKETS_US.get(slot).copied().unwrap_or(u64::MAX));
            }
        }
        unreachable!("the buckets add up to count")
    }

    /// Writes the histogram as Prometheus `_bucket`, `_sum` and `_count` series, in
    /// seconds as Prometheus expects. `labels` is either empty or `key="value",...`.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (slot, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[slot];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{}\"}} {cumulative}",
                seconds(*bound)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", seconds(self.sum_us));
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Microseconds as a decimal number of seconds, exactly.
fn seconds(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    if fraction == 0 {
        whole.to_string()
    } else {
        let digits = format!("{fraction:06}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Writes one counter or gauge sample with its HELP and TYPE lines.
pub fn render_scalar(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    assert!(kind == "counter" || kind == "gauge");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        let mut h = Histogram::new();
        for us in [5, 10, 11, 1_000, 20_000_000] {
            h.record_us(us);
        }
        let mut text = String::new();
        h.render(&mut text, "vigil_fsync_seconds", "fsync latency", "");
        assert!(
            text.contains("vigil_fsync_seconds_bucket{le=\"0.00001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("vigil_fsync_seconds_bucket{le=\"0.000025\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("vigil_fsync_seconds_bucket{le=\"0.001\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("vigil_fsync_seconds_bucket{le=\"10\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("vigil_fsync_seconds_bucket{le=\"+Inf\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("vigil_fsync_seconds_count 5\n"), "{text}");
        assert!(
            text.contains("vigil_fsync_seconds_sum 20.001026\n"),
            "{text}"
        );
    }

    #[test]
    fn quantiles_are_upper_bounds() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile_upper_bound_us(0.5), None);
        for _ in 0..99 {
            h.record_us(300);
        }
        h.record_us(40_000);
        assert_eq!(h.quantile_upper_bound_us(0.5), Some(500));
        assert_eq!(h.quantile_upper_bound_us(0.99), Some(500));
        assert_eq!(h.quantile_upper_bound_us(1.0), Some(50_000));
    }

    #[test]
    fn labels_and_scalars() {
        let mut h = Histogram::new();
        h.record_us(100);
        let mut text = String::new();
        h.render(&mut text, "lat", "x", "peer=\"2\"");
        assert!(
            text.contains("lat_bucket{peer=\"2\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lat_count{peer=\"2\"} 1\n"), "{text}");
        render_scalar(&mut text, "vigil_term", "gauge", "current term", 7);
        assert!(text.ends_with("# TYPE vigil_term gauge\nvigil_term 7\n"));
    }
}
