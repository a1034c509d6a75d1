//! Progress bars of transfers, training and evaluation (drawn only on a terminal).

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
