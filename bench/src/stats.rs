//! Latency histograms, outcome tallies and plain-text tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency recorded: anything slower is clamped to it.
const MAX_NANOS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds (3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(
            Histogram::new_with_bounds(1, MAX_NANOS, 3)
                .expect("constant histogram bounds are valid"),
        )
    }
}

impl Latency {
    pub fn record(&mut self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(MAX_NANOS);
        self.0.saturating_record(nanos.clamp(1, MAX_NANOS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Both have the same bounds, so adding cannot fail; saturate otherwise.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at `quantile` (0.0 to 1.0), or `None` when nothing was
    /// recorded.
    pub fn at(&self, quantile: f64) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(quantile))
    }

    pub fn max(&self) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.max())
    }

    /// `p50 / p99 / p99.9 / max` as table cells.
    pub fn cells(&self) -> [String; 4] {
        [
            ms(self.at(0.50)),
            ms(self.at(0.99)),
            ms(self.at(0.999)),
            ms(self.max()),
        ]
    }
}

/// Nanoseconds as milliseconds with three decimals (`0.412 ms`), or `-`.
pub fn ms(nanos: Option<u64>) -> String {
    match nanos {
        Some(n) => format!("{:.3} ms", n as f64 / 1e6),
        None => "-".to_owned(),
    }
}

/// A rate with thousands separators, no decimals (`12,345`).
pub fn rate(per_sec: f64) -> String {
    let whole = per_sec.max(0.0).round() as u64;
    let digits = whole.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Counts of outcomes by name (`200 invalid`, `429`, `io error`...).
#[derive(Debug, Clone, Default)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, outcome: &str) {
        if let Some(n) = self.0.get_mut(outcome) {
            *n += 1;
        } else {
            self.0.insert(outcome.to_owned(), 1);
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Every outcome except `expected`, as `429 ×12, io error ×1`, or `0`.
    pub fn errors_except(&self, expected: &str) -> String {
        let errors: Vec<String> = self
            .0
            .iter()
            .filter(|(k, _)| k.as_str() != expected)
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect();
        if errors.is_empty() {
            "0".to_owned()
        } else {
            errors.join(", ")
        }
    }
}

/// A plain-text table: a header row and rows of cells, columns padded to fit.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = width - cell.chars().count();
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out.push('\n');
            out
        };
        let mut out = line(&self.header);
        out.push('|');
        for width in &widths {
            out.push_str(&"-".repeat(width + 2));
            out.push('|');
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_and_rates_format_for_tables() {
        let check = |nanos: Option<u64>, expected: &str| assert_eq!(ms(nanos), expected);
        check(Some(412_345), "0.412 ms");
        check(Some(1_999_500), "2.000 ms");
        check(Some(12_000_000_000), "12000.000 ms");
        check(None, "-");
        assert_eq!(rate(0.4), "0");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(1234.6), "1,235");
        assert_eq!(rate(12_345_678.0), "12,345,678");
        assert_eq!(mib(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let mut latency = Latency::default();
        assert_eq!(latency.cells()[0], "-");
        for micros in 1..=1000u64 {
            latency.record(Duration::from_micros(micros));
        }
        // 3 significant digits: within 0.1% of the exact value.
        let p50 = latency.at(0.5).unwrap();
        assert!((499_500..=500_500).contains(&p50), "{p50}");
        let p99 = latency.at(0.99).unwrap();
        assert!((989_000..=991_000).contains(&p99), "{p99}");
        let mut other = Latency::default();
        other.record(Duration::from_secs(2));
        latency.merge(&other);
        assert_eq!(latency.count(), 1001);
        let max = latency.max().unwrap();
        assert!((2_000_000_000..2_002_000_000).contains(&max), "{max}");
    }

    #[test]
    fn tallies_list_what_was_not_expected() {
        let mut tally = Tally::default();
        for outcome in ["200 invalid", "200 invalid", "429", "io error"] {
            tally.add(outcome);
        }
        assert_eq!(tally.total(), 4);
        assert_eq!(tally.errors_except("200 invalid"), "429 ×1, io error ×1");
        assert_eq!(
            tally.errors_except("other"),
            "200 invalid ×2, 429 ×1, io error ×1"
        );
    }

    #[test]
    fn tables_pad_columns() {
        let mut table = Table::new(&["a", "bbb"]);
        table.row(vec!["long".into(), "x".into()]);
        assert_eq!(
            table.render(),
            "| a    | bbb |\n|------|-----|\n| long | x   |\n"
        );
    }
}
