//! A denoising progress bar on terminals; silent elsewhere.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use retouch_core::editor::EditObserver;

/// Shows `step/total` with rate and ETA while an edit runs.
pub struct StepBar {
    bar: ProgressBar,
}

impl StepBar {
    /// A bar for `total` steps, drawn only if stderr is a terminal.
    pub fn new(total: u64, label: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Self { bar }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl EditObserver for StepBar {
    fn on_step(&mut self, step: usize, _total: usize, _elapsed: Duration) {
        self.bar.set_position(step as u64);
    }
}
