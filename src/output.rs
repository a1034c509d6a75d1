//! Human-readable output helpers.

use std::borrow::Cow;
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
            let mut lines = value.lines().map(printable);
            writeln!(f, "{label:<width$}  {}", lines.next().unwrap_or_default())?;
            for line in lines {
                writeln!(f, "{:<width$}  {line}", "")?;
            }
        }
        Ok(())
    }
}

/// Values come from files and registries: control characters and text-direction overrides in
/// them are shown escaped, as printed they could move the cursor, recolor the terminal or fake
/// rows of the table.
fn printable(line: &str) -> Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !line.chars().any(hidden) {
        return Cow::Borrowed(line);
    }
    Cow::Owned(
        line.chars()
            .map(|c| {
                if hidden(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

pub fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_drive_the_terminal() {
        let mut table = Table::default();
        table.row("model", "llama\u{1b}[31m\u{202e}x\ry");
        table.row("notes", "one\ntwo\tthree");
        assert_eq!(
            table.to_string(),
            "model  llama\\u{1b}[31m\\u{202e}x\\u{d}y\nnotes  one\n       two\tthree\n"
        );
    }
}
