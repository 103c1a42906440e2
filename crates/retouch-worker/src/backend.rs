//! The model thread: one OS thread owns the [`Editor`] (inference is blocking and, on a GPU,
//! tied to one device context); async code reaches it through a channel of capacity 1 and
//! gets each answer on a `oneshot`. The thread loads the model itself, so loading never blocks
//! the runtime, and publishes its state on a `watch` for `/readyz`.
//!
//! A panic inside the editor is caught and reported as a model failure of that batch: no job
//! can take the worker down.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use retouch_core::editor::{EditBatch, EditErrorKind, EditObserver, EditedImage, Editor, ModelInfo};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

/// What the model thread is doing.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    /// Loading weights.
    Loading,
    /// Ready to edit.
    Ready(ModelInfo),
    /// Loading failed; the worker cannot serve.
    Failed(String),
}

/// Why a model call produced no images.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// The batch is invalid for this model (e.g. an unsupported scheduler): permanent.
    #[error("invalid for this model: {0}")]
    Invalid(String),
    /// The model failed (out of memory, device error, a panic): may pass alone or later.
    #[error("model failure: {0}")]
    Model(String),
    /// The call ran past its deadline.
    #[error("the model call exceeded its {0:?} deadline")]
    Timeout(Duration),
    /// The caller cancelled it (shutdown).
    #[error("cancelled")]
    Cancelled,
    /// The model thread is gone or never became ready.
    #[error("model unavailable: {0}")]
    Unavailable(String),
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
    reply: oneshot::Sender<Result<BatchOutput, InferError>>,
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
                let _ = state_tx.send(ModelState::Ready(info));
                while let Some(cmd) = rx.blocking_recv() {
                    let _enter = cmd.span.enter();
                    let started = Instant::now();
                    let deadline = started + cmd.timeout;
                    let mut observer = StepObserver { metrics: &metrics, last: started, deadline, cancel: &cmd.cancel };
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| editor.edit(&cmd.batch, &mut observer)));
                    let result = match outcome {
                        Ok(Ok(images)) => Ok(BatchOutput { images, seconds: started.elapsed().as_secs_f64() }),
                        Ok(Err(e)) => Err(match e.kind {
                            EditErrorKind::InvalidInput => InferError::Invalid(e.message),
                            EditErrorKind::Model => InferError::Model(e.message),
                            EditErrorKind::Cancelled if cmd.cancel.load(Ordering::Relaxed) => InferError::Cancelled,
                            EditErrorKind::Cancelled => InferError::Timeout(cmd.timeout),
                        }),
                        Err(panic) => {
                            let message = panic
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "unknown panic".into());
                            tracing::error!(%message, "the model panicked; the batch fails, the worker carries on");
                            Err(InferError::Model(format!("the model panicked: {message}")))
                        }
                    };
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
                ModelState::Ready(info) => return Ok(info.clone()),
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
    /// [`InferError`] classifying the failure.
    pub async fn edit(
        &self,
        batch: EditBatch,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
    ) -> Result<BatchOutput, InferError> {
        let (reply, answer) = oneshot::channel();
        let cmd = Command { batch, timeout, cancel, reply, span: tracing::Span::current() };
        self.commands.send(cmd).await.map_err(|_| InferError::Unavailable("the model thread has stopped".into()))?;
        answer.await.map_err(|_| InferError::Unavailable("the model thread dropped the batch".into()))?
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
