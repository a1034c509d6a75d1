//! How the binaries print an error for a person.

use std::error::Error;
use std::process::ExitCode;

/// An error and its causes on one line, `outer: cause: …`, leaving out a cause the line already
/// ends with (most of our errors write their cause at the end of their own message and also
/// expose it as their source).
pub fn error_line(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = error.source();
    }
    line
}

/// A binary's exit: success, or the error on one line of stderr and failure.
pub fn exit<E: AsRef<dyn Error + 'static>>(result: Result<(), E>) -> ExitCode {
    exit_with(result, |_| 1)
}

/// As [`exit`], with the status of each error chosen by `status` (scripts tell some answers
/// from failures by it).
pub fn exit_with<E: AsRef<dyn Error + 'static>>(
    result: Result<(), E>,
    status: impl Fn(&E) -> u8,
) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_line(error.as_ref()));
            ExitCode::from(status(&error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(&'static str, Option<std::io::Error>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_ref().map(|e| e as _)
        }
    }

    #[test]
    fn a_cause_is_written_once() {
        let refused = || std::io::Error::other("connection refused");
        let repeating = Wrapped("cannot reach x: connection refused", Some(refused()));
        assert_eq!(error_line(&repeating), "cannot reach x: connection refused");
        let terse = Wrapped("cannot reach x", Some(refused()));
        assert_eq!(error_line(&terse), "cannot reach x: connection refused");
        let elsewhere = Wrapped("connection refused by x, retrying", Some(refused()));
        assert_eq!(
            error_line(&elsewhere),
            "connection refused by x, retrying: connection refused"
        );
    }
}
