//! Human-readable output helpers.

use std::fmt;

/// Two aligned columns: a label and a (possibly multi-line) value.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn row(&mut self, label: &str, value: impl fmt::Display) {
        self.rows.push((label.to_owned(), value.to_string()));
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .rows
            .iter()
            .map(|(label, _)| label.chars().count())
            .max()
            .unwrap_or(0);
        for (label, value) in &self.rows {
            let mut lines = value.lines();
            writeln!(f, "{label:<width$}  {}", lines.next().unwrap_or(""))?;
            for line in lines {
                writeln!(f, "{:<width$}  {line}", "")?;
            }
        }
        Ok(())
    }
}

pub fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}
