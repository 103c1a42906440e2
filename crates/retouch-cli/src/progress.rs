//! The CLI's progress bars, one setup for all: drawn on stderr when it is a terminal, silent
//! elsewhere (logs and CI stay clean). [`bar`] for counts (batch images, submitted jobs,
//! watched results), [`StepBar`] for an edit's denoising steps.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use retouch_core::editor::EditObserver;

/// A bar for `total` items in `template` (indicatif's syntax), drawn only when stderr is a
/// terminal.
pub fn bar(total: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(ProgressStyle::with_template(template).expect("static template").progress_chars("=> "));
    bar
}

/// Shows `step/total` with rate and ETA while an edit runs.
pub struct StepBar {
    bar: ProgressBar,
}

impl StepBar {
    /// A bar for `total` steps, drawn only if stderr is a terminal.
    pub fn new(total: u64, label: &str) -> Self {
        let bar = bar(total, "{prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}");
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
