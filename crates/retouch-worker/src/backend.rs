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
    /// One entry per request, in order: the edited image, or `None` for an image that
    /// [`BatchHooks::drop_image`] dropped.
    pub images: Vec<Option<EditedImage>>,
    /// Wall time of the call.
    pub seconds: f64,
}

/// The progress hook: `(step, total, elapsed since the call started, running)`.
pub type OnStep = Box<dyn FnMut(usize, usize, Duration, &[bool]) + Send>;

/// What the caller hears from, and says to, a running batch; both are called on the model
/// thread between denoising steps, so they must be quick and must not block.
pub struct BatchHooks {
    /// After each step: `(step, total, elapsed since the call started, running)` where
    /// `running[i]` says whether request `i` is still being computed.
    pub on_step: OnStep,
    /// Before each step, for each request still running: drop it now?
    pub drop_image: Box<dyn FnMut(usize) -> bool + Send>,
}

impl Default for BatchHooks {
    fn default() -> Self {
        Self { on_step: Box::new(|_, _, _, _| {}), drop_image: Box::new(|_| false) }
    }
}

impl std::fmt::Debug for BatchHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHooks").finish_non_exhaustive()
    }
}

/// One batch for the model thread.
struct Command {
    /// The images and their parameters.
    batch: EditBatch,
    /// Deadline of the call.
    timeout: Duration,
    /// Set to stop the whole call (shutdown).
    cancel: Arc<AtomicBool>,
    /// Progress out, per-image drops in.
    hooks: BatchHooks,
    /// Where the answer goes.
    reply: oneshot::Sender<Result<BatchOutput, EditError>>,
    /// The caller's span, entered on the model thread.
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

/// Reports steps to the metrics and the caller's hooks, drops the images the caller drops,
/// and stops at the deadline or on cancellation.
struct StepObserver<'a> {
    /// Step durations go here.
    metrics: &'a Metrics,
    /// When the previous step ended.
    last: Instant,
    /// The call's deadline.
    deadline: Instant,
    /// The whole call's stop flag.
    cancel: &'a AtomicBool,
    /// The caller's hooks.
    hooks: &'a mut BatchHooks,
    /// Which requests are still running.
    running: Vec<bool>,
}

impl EditObserver for StepObserver<'_> {
    fn on_step(&mut self, step: usize, total: usize, elapsed: Duration) {
        let now = Instant::now();
        self.metrics.step(now.duration_since(self.last).as_secs_f64());
        self.last = now;
        (self.hooks.on_step)(step, total, elapsed, &self.running);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    fn drop_image(&mut self, index: usize) -> bool {
        let drop = (self.hooks.drop_image)(index);
        if drop && let Some(r) = self.running.get_mut(index) {
            *r = false;
        }
        drop
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
                while let Some(mut cmd) = rx.blocking_recv() {
                    let span = cmd.span.clone();
                    let _enter = span.enter();
                    let result = run_batch(editor.as_ref(), &mut cmd, &metrics);
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
        hooks: BatchHooks,
    ) -> Result<BatchOutput, EditError> {
        let unavailable = |message: &str| EditError { kind: EditErrorKind::Unavailable, message: message.into() };
        let (reply, answer) = oneshot::channel();
        let cmd = Command { batch, timeout, cancel, hooks, reply, span: tracing::Span::current() };
        self.commands.send(cmd).await.map_err(|_| unavailable("model unavailable: the model thread has stopped"))?;
        answer.await.map_err(|_| unavailable("model unavailable: the model thread dropped the batch"))?
    }
}

/// One batch on the model thread: the editor's call under the deadline and the cancel flag,
/// a panic turned into a model failure.
fn run_batch(editor: &dyn Editor, cmd: &mut Command, metrics: &Metrics) -> Result<BatchOutput, EditError> {
    let started = Instant::now();
    let deadline = started + cmd.timeout;
    let n = cmd.batch.requests.len();
    let mut observer = StepObserver {
        metrics,
        last: started,
        deadline,
        cancel: &cmd.cancel,
        hooks: &mut cmd.hooks,
        running: vec![true; n],
    };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| editor.edit(&cmd.batch, &mut observer)));
    let running = observer.running;
    match outcome {
        Ok(Ok(images)) => {
            // One image per request still running, in order; an editor that answers otherwise
            // is broken (the batch fails as a model failure rather than misplace images).
            let expected = running.iter().filter(|r| **r).count();
            if images.len() != expected {
                return Err(EditError {
                    kind: EditErrorKind::Model,
                    message: format!("the model returned {} images for {expected} requests", images.len()),
                });
            }
            let mut images = images.into_iter();
            let images = running.iter().map(|&r| if r { images.next() } else { None }).collect();
            Ok(BatchOutput { images, seconds: started.elapsed().as_secs_f64() })
        }
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
