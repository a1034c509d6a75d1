//! Progress bars of transfers, training and evaluation (drawn only on a terminal).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cartridge_client::Progress;
use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A bar drawn with `template` on stderr (where it is a terminal), none when `hidden` (e.g. for
/// `--json`). In `template`, `{left}` is the time left, "(2 minutes left)", once there is an
/// estimate (nothing before: indicatif's `{eta}` says 0s until it knows a speed), while the bar
/// goes on (an abandoned one's estimate is 0 s).
pub fn bar(template: &str, hidden: bool) -> ProgressBar {
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "left",
            |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                let going = !state.is_finished() && state.len().is_some_and(|l| state.pos() < l);
                if going && state.per_sec() > 0.0 {
                    let _ = write!(out, "({} left)", HumanDuration(state.eta()));
                }
            },
        );
    let target = if hidden {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    ProgressBar::with_draw_target(None, target).with_style(style)
}

/// Progress as log lines where bars on stderr draw nothing (a job's log, a terminal with
/// TERM=dumb): each phase's first and last line, and one every [`LOG_EVERY`] between. (The
/// phase and time of the line written last.)
pub struct Lines(Option<Mutex<Option<(String, Instant)>>>);

/// How often [`Lines`] writes within a phase.
const LOG_EVERY: Duration = Duration::from_secs(30);

impl Lines {
    /// Lines where a bar on stderr would draw nothing, none elsewhere.
    pub fn where_bars_cannot_draw() -> Self {
        Self(
            ProgressDrawTarget::stderr()
                .is_hidden()
                .then(|| Mutex::new(None)),
        )
    }

    /// Writes "`phase`: `line`" where lines are written, if it is the phase's first or `last`,
    /// or the line before is [`LOG_EVERY`] old.
    pub fn line(&self, phase: &str, last: bool, line: impl FnOnce() -> String) {
        let Some(lines) = &self.0 else { return };
        let mut logged = lines.lock().unwrap_or_else(|e| e.into_inner());
        let due = |(written, at): &(String, Instant)| written != phase || at.elapsed() >= LOG_EVERY;
        if last || logged.as_ref().is_none_or(due) {
            eprintln!("{phase}: {}", line());
            *logged = Some((phase.to_owned(), Instant::now()));
        }
    }
}

/// `bar`'s estimate of the time left, for a log line: none before it knows a speed, none at its
/// end.
pub fn left(bar: &ProgressBar) -> String {
    if bar.length().is_none_or(|length| bar.position() >= length) || bar.per_sec() == 0.0 {
        return String::new();
    }
    format!(", {} left", HumanDuration(bar.eta()))
}

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar labelled `message`; hidden when `hidden` (e.g. for `--json`).
    pub fn new(message: &str, hidden: bool) -> Self {
        let bar = bar(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {left}",
            hidden,
        );
        bar.set_style(bar.style().progress_chars("=> "));
        bar.set_message(message.to_owned());
        Self { bar }
    }
}

impl Bar {
    /// Leaves the bar where it stopped, for a message to follow on its own line.
    pub fn abandon(&self) {
        self.bar.abandon();
    }
}

impl Progress for Bar {
    fn begin(&self, total: u64, already: u64) {
        self.bar.set_length(total);
        self.bar.set_position(already);
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn retreat(&self, bytes: u64) {
        self.bar.dec(bytes);
    }

    fn end(&self) {
        self.bar.finish_and_clear();
    }
}
