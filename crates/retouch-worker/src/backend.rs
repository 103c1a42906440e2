//! The model thread: one OS thread owns the [`Editor`] (inference is blocking and, on a GPU,
//! tied to one device context); async code reaches it through a channel of capacity 1 and
//! gets each answer on a `oneshot`. The thread loads the model itself, so loading never blocks
//! the runtime, and publishes its state on a `watch` for `/readyz`.
//!
//! A panic inside the editor is caught and reported as a model failure of that batch: no job
//! can take the worker down. A model failure (an error of kind `model`, or a panic) marks the
//! model [`Unhealthy`](ModelState::Unhealthy): `/readyz` answers 503 until a later batch
//! succeeds or, on a worker left idle, until the hold of [`crate::http`] has passed.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use retouch_core::editor::{EditBatch, EditError, EditErrorKind, EditObserver, EditedImage, Editor, ModelInfo};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

/// What the model thread is doing.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    /// Loading weights.
    Loading,
    /// Ready to edit.
    Ready(ModelInfo),
    /// Loaded, but its last batch failed in the model (out of memory, a device error, a
    /// panic); it still takes batches and is `Ready` again after the next success.
    Unhealthy {
        /// The loaded model.
        info: ModelInfo,
        /// The last failure.
        error: String,
        /// When it failed.
        since: Instant,
    },
    /// Loading failed; the worker cannot serve.
    Failed(String),
}

/// A successful model call.
#[derive(Debug)]
pub struct BatchOutput {
    /// One image per request, in order.
    pub images: Vec<EditedImage>,
    /// Wall time of the call.
    pub seconds: f64,
}

struct Command {
    batch: EditBatch,
    timeout: Duration,
    cancel: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<BatchOutput, EditError>>,
    span: tracing::Span,
}

/// Handle to the model thread.
pub struct Backend {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<ModelState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("state", &*self.state.borrow()).finish_non_exhaustive()
    }
}

/// Reports steps to the metrics and stops at the deadline or on cancellation.
struct StepObserver<'a> {
    metrics: &'a Metrics,
    last: Instant,
    deadline: Instant,
    cancel: &'a AtomicBool,
}

impl EditObserver for StepObserver<'_> {
    fn on_step(&mut self, _step: usize, _total: usize, _elapsed: Duration) {
        let now = Instant::now();
        self.metrics.step(now.duration_since(self.last).as_secs_f64());
        self.last = now;
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

impl Backend {
    /// Starts the model thread; it calls `load` first. `version` labels `retouch_build_info`.
    ///
    /// # Panics
    /// If the OS refuses to create a thread.
    pub fn spawn<F>(load: F, metrics: Arc<Metrics>, version: &'static str) -> Self
    where
        F: FnOnce() -> Result<Box<dyn Editor>, String> + Send + 'static,
    {
        // Capacity 1: the dispatcher hands over the next batch only when the thread is free
        // to take it, so exactly one batch waits while one runs.
        let (commands, mut rx) = mpsc::channel::<Command>(1);
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let thread = std::thread::Builder::new()
            .name("retouch-model".into())
            .spawn(move || {
                let started = Instant::now();
                let editor = match std::panic::catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(editor)) => editor,
                    Ok(Err(message)) => {
                        tracing::error!(error = %message, "model failed to load");
                        let _ = state_tx.send(ModelState::Failed(message));
                        return;
                    }
                    Err(_) => {
                        let _ = state_tx.send(ModelState::Failed("the model loader panicked".into()));
                        return;
                    }
                };
                let info = editor.info().clone();
                metrics.model_loaded(started.elapsed().as_secs_f64(), version, &info.name, &info.device);
                let _ = state_tx.send(ModelState::Ready(info.clone()));
                while let Some(cmd) = rx.blocking_recv() {
                    let _enter = cmd.span.enter();
                    let result = run_batch(editor.as_ref(), &cmd, &metrics);
                    // Health changes on evidence about the model only: a success, or a failure
                    // in the model. An invalid batch, a timeout or a cancel says nothing new.
                    let next = match &result {
                        Ok(_) => Some(ModelState::Ready(info.clone())),
                        Err(e) if e.kind == EditErrorKind::Model => Some(ModelState::Unhealthy {
                            info: info.clone(),
                            error: e.message.clone(),
                            since: Instant::now(),
                        }),
                        Err(_) => None,
                    };
                    if let Some(next) = next {
                        state_tx.send_if_modified(|state| {
                            let changed = *state != next;
                            *state = next;
                            changed
                        });
                    }
                    // The caller may have gone (shutdown); nothing to do then.
                    let _ = cmd.reply.send(result);
                }
            })
            .expect("cannot start the model thread");
        Self { commands, state, thread: Some(thread) }
    }

    /// The current state.
    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes (for health endpoints).
    pub fn watch(&self) -> watch::Receiver<ModelState> {
        self.state.clone()
    }

    /// Waits until the model is loaded.
    ///
    /// # Errors
    /// The loading error.
    pub async fn ready(&self) -> Result<ModelInfo, String> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                ModelState::Ready(info) | ModelState::Unhealthy { info, .. } => return Ok(info.clone()),
                ModelState::Failed(e) => return Err(e.clone()),
                ModelState::Loading => {}
            }
            if rx.changed().await.is_err() {
                return Err("the model thread exited while loading".into());
            }
        }
    }

    /// Runs one batch on the model thread.
    ///
    /// # Errors
    /// [`EditError`]: the editor's own, [`EditErrorKind::Timeout`] past `timeout`,
    /// [`EditErrorKind::Cancelled`] when `cancel` was set, [`EditErrorKind::Model`] for a
    /// panic, [`EditErrorKind::Unavailable`] when the model thread is gone.
    pub async fn edit(
        &self,
        batch: EditBatch,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
    ) -> Result<BatchOutput, EditError> {
        let unavailable = |message: &str| EditError { kind: EditErrorKind::Unavailable, message: message.into() };
        let (reply, answer) = oneshot::channel();
        let cmd = Command { batch, timeout, cancel, reply, span: tracing::Span::current() };
        self.commands.send(cmd).await.map_err(|_| unavailable("model unavailable: the model thread has stopped"))?;
        answer.await.map_err(|_| unavailable("model unavailable: the model thread dropped the batch"))?
    }
}

/// One batch on the model thread: the editor's call under the deadline and the cancel flag,
/// a panic turned into a model failure.
fn run_batch(editor: &dyn Editor, cmd: &Command, metrics: &Metrics) -> Result<BatchOutput, EditError> {
    let started = Instant::now();
    let deadline = started + cmd.timeout;
    let mut observer = StepObserver { metrics, last: started, deadline, cancel: &cmd.cancel };
    match std::panic::catch_unwind(AssertUnwindSafe(|| editor.edit(&cmd.batch, &mut observer))) {
        Ok(Ok(images)) => Ok(BatchOutput { images, seconds: started.elapsed().as_secs_f64() }),
        // The observer stops the edit for both reasons; the flag tells which.
        Ok(Err(e)) if e.kind == EditErrorKind::Cancelled && !cmd.cancel.load(Ordering::Relaxed) => Err(EditError {
            kind: EditErrorKind::Timeout,
            message: format!("the model call exceeded its {:?} deadline", cmd.timeout),
        }),
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(%message, "the model panicked; the batch fails, the worker carries on");
            Err(EditError { kind: EditErrorKind::Model, message: format!("the model panicked: {message}") })
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once its current batch is done.
        let (closed, _) = mpsc::channel(1);
        self.commands = closed;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the model thread panicked while stopping");
        }
    }
}
