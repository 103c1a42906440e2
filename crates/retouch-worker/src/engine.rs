//! The job engine: a job's life, stage by stage, in the order this file reads.
//!
//! ```text
//! run: receive ─▶ prepare: validate ─▶ cancelled? ─▶ output exists? ─▶ fetch ─▶ decode ─▶ batcher ─▶ dispatch ─▶ infer ─▶ finish: encode ─▶ upload ─▶ settle: publish ─▶ ack
//!                          │            │             └─ yes: settle as a duplicate                          (cancelled?)  (cancelled?)  (cancelled?)  (failures: retry, or
//!                          │            └─ yes: settle as cancelled (no S3 access)                                                                     failure result + dead letter)
//!                          └─ invalid: failure result + dead letter
//! ```
//!
//! Reading order: [`run`] receives deliveries and spawns [`prepare`] for each; prepared jobs
//! go through the batcher ([`crate::batcher`]) to [`dispatch`], which runs one batch at a time
//! through [`infer`] on the model thread ([`crate::backend`]); each edited image gets its own
//! [`finish`] task; every path ends in one of the four settlements at the bottom
//! ([`Ctx::succeed`], [`Ctx::cancel`], [`Ctx::fail`], [`Ctx::release`]). What a failure means
//! (its kind, whether to retry) is decided in one place, [`crate::failure`].
//!
//! Cancellation ([`crate::cancel::CancelRegistry`]) is asked on arrival (before any S3
//! access), when a batch is handed to the model, between denoising steps (the image leaves
//! the running batch; its batch-mates finish bit-identical to their solo runs) and before the
//! upload; a cancelled job gets a `cancelled` result and is acked, never dead-lettered. Jobs
//! that asked for progress get a `started` event when their model call starts and throttled
//! `progress` events from the model thread, through a bounded buffer that drops rather than
//! waits, so events never slow inference or hold up a settlement.
//!
//! Concurrency, and why every queue is bounded:
//! * a semaphore of `concurrency` permits (= the broker prefetch) bounds deliveries in flight;
//!   each delivery holds one permit until it is settled;
//! * one task per delivery fetches and decodes, so the next batch is prepared while the model
//!   works; prepared jobs reach the batcher through a channel of `concurrency` slots;
//! * the dispatcher asks the batcher for a batch only when the model is free, so the batch
//!   (high-priority jobs first) is chosen at the last moment, and runs one batch at a time;
//! * each finished image gets its own task for encode → upload → publish → ack, overlapping the
//!   next inference.
//!
//! Transient errors are retried with exponential backoff until the delivery limit, then — like
//! permanent errors — answered with a failure result and a dead letter. Shutdown stops
//! receiving, gives back every job whose model call has not started, lets the running batch
//! finish within `shutdown_timeout` (else gives its jobs back too), and waits for the uploads,
//! results and acks in progress. Outcomes are counted once, in the metrics; a run's
//! [`Summary`] is read from them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use retouch_core::backoff::Backoff;
use retouch_core::editor::{EditBatch, EditError, EditErrorKind, EditRequest, EditedImage, ModelInfo};
use retouch_core::error::JobError;
use retouch_core::events::{EventType, JobEvent};
use retouch_core::imaging::{self, DecodeLimits};
use retouch_core::job::{
    Envelope, JobResult, PROTOCOL_VERSION, Priority, ResultError, Status, Timings, ValidJob, parse_job,
};
use retouch_core::queue::{Delivery, DeliveryInfo, JobSource, ResultSink};
use retouch_core::store::ObjectStore;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, BatchHooks};
use crate::batcher::{self, BatchKey, BatchPolicy, BatchRequest, Batchable};
use crate::cancel::CancelRegistry;
use crate::failure::{self, Object};
pub use crate::metrics::Summary;
use crate::metrics::{Metrics, Outcome, Stage};

/// Object metadata keys written with every output (S3 user metadata).
pub mod meta {
    /// The job that produced the object; a redelivery finding it skips the work.
    pub const JOB_ID: &str = "retouch-job-id";
    /// Seed used.
    pub const SEED: &str = "retouch-seed";
    /// Model used.
    pub const MODEL: &str = "retouch-model";
    /// Output width.
    pub const WIDTH: &str = "retouch-width";
    /// Output height.
    pub const HEIGHT: &str = "retouch-height";
    /// The safety checker's verdict (`true`/`false`), when one ran: a duplicate result repeats it.
    pub const NSFW: &str = "retouch-nsfw-content-detected";
}

/// The engine's knobs: the `[engine]` section of the worker's configuration file, which
/// deserializes straight into it (every default is here), plus two values the caller sets
/// from other sections ([`concurrency`](Self::concurrency), [`block_nsfw`](Self::block_nsfw)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Where outputs go when a job names none: `<output_prefix>/<job_id>.<ext>`.
    pub output_prefix: String,
    /// Largest accepted input object, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted input image (width × height, before resizing).
    pub max_input_pixels: u64,
    /// Most compatible jobs (same processed size, steps, scheduler) per model call. Each image
    /// runs three UNet rows per step, so GPU memory grows ~3× per image; 4 for a 24 GB card at
    /// 512 px in f16 is a rule of thumb, not yet measured on a GPU. 1 disables batching. 1–64.
    pub max_batch: usize,
    /// Longest a job waits for companions before its batch starts anyway.
    #[serde(with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// Deadline of one model call; a batch past it fails with `timeout`.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// On a stop (SIGTERM): time the running batch gets to finish before its jobs are given
    /// back. Keep it below Kubernetes' `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// First retry delay of a transient failure; doubles per attempt (±20 % jitter).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of the retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Name reported in results; empty = the host name (the pod name in Kubernetes).
    pub worker_name: String,
    /// Deliveries in flight (the broker prefetch); 0 = 3 × [`max_batch`](Self::max_batch).
    /// Not a configuration key: the worker sets it from `[amqp] prefetch`.
    #[serde(skip)]
    pub concurrency: usize,
    /// Fail a job whose image the safety checker flagged (`nsfw`, permanent: failure result and
    /// dead letter, no output) instead of writing the black image (the `block` policy). Not a
    /// key of this section: it follows `[model] safety_checker`.
    #[serde(skip)]
    pub block_nsfw: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            output_prefix: "s3://retouch/outputs".into(),
            max_input_bytes: 50 << 20,
            max_input_pixels: 50_000_000,
            max_batch: 4,
            max_batch_wait: Duration::from_millis(250),
            job_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
            worker_name: String::new(),
            concurrency: 0,
            block_nsfw: false,
        }
    }
}

impl EngineSettings {
    /// Checks the ranges the types do not.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.max_batch) {
            return Err(format!("max_batch {}: must be 1–64", self.max_batch));
        }
        if retouch_core::job::ObjectUrl::parse(&format!("{}/x", self.output_prefix.trim_end_matches('/'))).is_err() {
            return Err(format!(
                "output_prefix {:?}: must look like s3://bucket or s3://bucket/path",
                self.output_prefix
            ));
        }
        for (key, zero) in [
            ("job_timeout", self.job_timeout.is_zero()),
            ("max_input_bytes", self.max_input_bytes == 0),
            ("max_input_pixels", self.max_input_pixels == 0),
        ] {
            if zero {
                return Err(format!("{key}: must be positive"));
            }
        }
        Ok(())
    }

    /// Deliveries in flight: [`concurrency`](Self::concurrency), or 3 × `max_batch` when 0.
    pub fn effective_concurrency(&self) -> usize {
        if self.concurrency == 0 { 3 * self.max_batch.max(1) } else { self.concurrency }
    }

    /// The batcher's rules.
    pub fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy { max_batch: self.max_batch.max(1), max_wait: self.max_batch_wait }
    }

    /// The decoder's limits.
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits { max_pixels: self.max_input_pixels, max_bytes: self.max_input_bytes }
    }
}

/// What reaches the engine from outside a job's own message: the cancel requests, and the
/// webhook policy.
#[derive(Debug, Default)]
pub struct Control {
    /// Cancel requests in force (filled by the cancel feed).
    pub cancels: Arc<CancelRegistry>,
    /// Whether, and to where, jobs may ask for webhooks.
    pub webhooks: WebhookPolicy,
}

/// Which webhook URLs jobs may name (the delivery itself is the relay's).
#[derive(Clone, Debug, Default)]
pub struct WebhookPolicy {
    /// A signing secret is configured: without one, a job asking for a webhook is invalid.
    pub enabled: bool,
    /// The hosts that may be called.
    pub allow: retouch_webhooks::AllowList,
    /// `http://` URLs are accepted (else only `https://`).
    pub allow_http: bool,
}

/// Progress events waiting for the publisher; beyond this many, new ones are dropped.
const EVENT_BUFFER: usize = 1024;

/// Errors that end the engine (not a job).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model never became ready.
    #[error("model unavailable: {0}")]
    Model(String),
}

// --- receive --------------------------------------------------------------------------------

/// Runs the engine until `shutdown` resolves (or a finite source is exhausted), then drains.
/// Returns how this run settled its deliveries.
///
/// `source.next()` must be cancel-safe (it is raced against `shutdown`).
///
/// # Errors
/// [`EngineError::Model`] when the model never becomes ready.
#[allow(clippy::too_many_arguments)] // the engine's seams, each a different kind of thing
pub async fn run<S, O, R>(
    settings: EngineSettings,
    mut source: S,
    store: Arc<O>,
    sink: Arc<R>,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    control: Control,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, EngineError>
where
    S: JobSource,
    O: ObjectStore,
    R: ResultSink,
{
    let model = backend.ready().await.map_err(EngineError::Model)?;
    let settled_before = metrics.summary();
    let concurrency = settings.effective_concurrency();
    let policy = settings.batch_policy();
    let tasks = TaskTracker::new();
    let retry = Backoff::new(settings.retry_backoff, settings.retry_backoff_max).with_jitter(0.8, 1.2);
    // Progress events: the model thread drops into a bounded buffer, a task publishes.
    let (events, mut event_rx) = mpsc::channel::<(JobEvent, Option<String>)>(EVENT_BUFFER);
    let event_task = {
        let (sink, metrics) = (sink.clone(), metrics.clone());
        tokio::spawn(async move {
            while let Some((event, reply_to)) = event_rx.recv().await {
                match sink.publish_event(&event, reply_to.as_deref()).await {
                    Ok(()) => metrics.event(true),
                    Err(e) => {
                        metrics.event(false);
                        tracing::debug!(error = %e, "progress event not published");
                    }
                }
            }
        })
    };
    let ctx = Arc::new(Ctx {
        settings,
        retry,
        store,
        sink,
        metrics: metrics.clone(),
        model,
        control,
        events,
        tasks: tasks.clone(),
    });
    let stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(concurrency));

    // Prepared jobs wait here for the batcher: at most one per delivery in flight.
    let (to_batcher, batcher_rx) = mpsc::channel::<Prepared<S::Delivery>>(concurrency);
    // The dispatcher asks for the next batch when the model is free.
    let (batch_requests, batch_request_rx) = mpsc::channel::<BatchRequest<Prepared<S::Delivery>>>(1);
    let batcher_task = {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tokio::spawn(batcher::run(policy, batcher_rx, batch_request_rx, stop, move |p: Prepared<S::Delivery>| {
            ctx.release(p.flight)
        }))
    };
    let dispatcher_task = tokio::spawn(dispatch(ctx.clone(), backend, batch_requests, stop.clone()));

    tokio::pin!(shutdown);
    let stopped = loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break true,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let delivery = tokio::select! {
            biased;
            () = &mut shutdown => break true,
            next = source.next() => next,
        };
        match delivery {
            Ok(Some(delivery)) => {
                let flight = InFlight::new(delivery, Slot::new(permit, metrics.clone()));
                let info = flight.delivery.info();
                let span =
                    tracing::info_span!("job", id = info.message_id.as_deref().unwrap_or(""), attempt = info.attempt);
                tasks.spawn(prepare(ctx.clone(), flight, to_batcher.clone(), stop.clone()).instrument(span));
            }
            // A finite source (local mode) is exhausted: drain normally.
            Ok(None) => break false,
            Err(e) => {
                tracing::error!(error = %e, "the job source failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };

    if stopped {
        tracing::info!("stopping: no new jobs; giving back unstarted ones, finishing the running batch");
        stop.cancel();
        if let Err(e) = source.close().await {
            tracing::warn!(error = %e, "could not cancel the consumer");
        }
    }
    drop(to_batcher);
    // Preparers finish (or, stopped, give their job back); the batcher flushes (or releases)
    // what it holds and ends; the dispatcher finishes the running batch and ends; then the
    // uploads, results and acks in progress drain.
    let drain = async {
        let _ = batcher_task.await;
        let _ = dispatcher_task.await;
        tasks.close();
        tasks.wait().await;
    };
    if stopped {
        let limit = ctx.settings.shutdown_timeout + Duration::from_secs(60);
        if tokio::time::timeout(limit, drain).await.is_err() {
            tracing::error!(
                ?limit,
                "drain did not finish in time; unsettled jobs return to the queue when the connection closes"
            );
        }
    } else {
        drain.await;
    }
    // The last events go out (or are dropped) once nothing can make more.
    drop(ctx);
    let _ = tokio::time::timeout(Duration::from_secs(5), event_task).await;
    Ok(metrics.summary().since(&settled_before))
}

// --- prepare: validate, duplicate check, fetch, decode ---------------------------------------

/// Validate → duplicate check → fetch → decode, then hand the job to the batcher.
async fn prepare<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: Arc<Ctx<O, R>>,
    mut flight: InFlight<D>,
    to_batcher: mpsc::Sender<Prepared<D>>,
    stop: CancellationToken,
) {
    if let Some(published) = flight.delivery.info().published_at
        && let Ok(wait) = SystemTime::now().duration_since(published)
    {
        flight.record(&ctx.metrics, Stage::QueueWait, wait.as_secs_f64());
    }
    let job = match parse_job(flight.delivery.body()).and_then(|j| j.validate(&ctx.settings.output_prefix)) {
        Ok(job) => job,
        Err(e) => {
            // Its failure result still goes to its campaign's routing key when it names one.
            flight.envelope = Envelope::read(flight.delivery.body());
            return ctx.fail(flight, None, e).await;
        }
    };
    if ctx.cancelled(&job) {
        return ctx.cancel(flight, &job, "on arrival").await;
    }
    if let Err(e) = ctx.check_webhook(&job) {
        return ctx.fail(flight, Some(&job), e).await;
    }
    match ctx.store.head(&job.output).await {
        Ok(Some(existing)) if existing.metadata.get(meta::JOB_ID) == Some(&job.job.job_id) => {
            let dim = |k: &str| existing.metadata.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            let size = (dim(meta::WIDTH), dim(meta::HEIGHT));
            flight.nsfw_content_detected = existing.metadata.get(meta::NSFW).and_then(|v| v.parse().ok());
            return ctx.succeed(flight, &job, size, true).await;
        }
        Ok(Some(_)) => tracing::warn!(output = %job.output, "the output exists from another job; it will be replaced"),
        Ok(None) => {}
        Err(e) => return ctx.fail(flight, Some(&job), failure::storage(Object::Output, e)).await,
    }
    // After the duplicate check: a redelivery whose output exists is a success whatever model
    // the worker runs now.
    let Some(scheduler) = job.params.scheduler.or(ctx.model.default_scheduler) else {
        return ctx.fail(flight, Some(&job), failure::no_scheduler()).await;
    };
    if job.params.karras_sigmas == Some(true) && !scheduler.supports_karras_sigmas() {
        return ctx.fail(flight, Some(&job), failure::no_karras_sigmas(scheduler)).await;
    }
    if stop.is_cancelled() {
        return ctx.release(flight);
    }

    let started = Instant::now();
    let bytes = match ctx.store.get(&job.source, ctx.settings.max_input_bytes).await {
        Ok(bytes) => bytes,
        Err(e) => return ctx.fail(flight, Some(&job), failure::storage(Object::Source, e)).await,
    };
    flight.record(&ctx.metrics, Stage::Fetch, seconds(started));
    ctx.metrics.input_bytes(bytes.len());

    let started = Instant::now();
    let (limits, max_side, multiple) = (ctx.settings.limits(), job.params.max_side, ctx.model.size_multiple);
    let image = match tokio::task::spawn_blocking(move || imaging::prepare(&bytes, limits, max_side, multiple)).await {
        Ok(Ok(decoded)) => decoded.image,
        Ok(Err(e)) => return ctx.fail(flight, Some(&job), failure::image(e)).await,
        Err(e) => return ctx.fail(flight, Some(&job), failure::crashed(Object::Source, &e)).await,
    };
    flight.record(&ctx.metrics, Stage::Decode, seconds(started));
    if stop.is_cancelled() {
        return ctx.release(flight);
    }

    let key = BatchKey {
        size: image.dimensions(),
        steps: job.params.steps,
        scheduler,
        karras_sigmas: job.params.karras_sigmas,
    };
    if let Err(mpsc::error::SendError(prepared)) = to_batcher.send(Prepared { flight, job, image, key }).await {
        ctx.release(prepared.flight);
    }
}

// --- dispatch and infer ----------------------------------------------------------------------

/// Asks the batcher for a batch whenever the model is free and runs it; settles the jobs
/// cancelled while they waited; after a stop, gives back every batch whose model call has not
/// started.
async fn dispatch<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: Arc<Ctx<O, R>>,
    backend: Arc<Backend>,
    requests: mpsc::Sender<BatchRequest<Prepared<D>>>,
    stop: CancellationToken,
) {
    loop {
        let (reply, batch) = oneshot::channel();
        if requests.send(reply).await.is_err() {
            return;
        }
        // The batcher ends (dropping the request) once its input is closed and empty.
        let Ok(batch) = batch.await else { return };
        if stop.is_cancelled() {
            batch.into_iter().for_each(|p| ctx.release(p.flight));
            continue;
        }
        let mut jobs = Vec::with_capacity(batch.len());
        for p in batch {
            if ctx.cancelled(&p.job) {
                let ctx = ctx.clone();
                ctx.tasks.clone().spawn(async move { ctx.cancel(p.flight, &p.job, "waiting for the model").await });
            } else {
                jobs.push(p);
            }
        }
        if !jobs.is_empty() {
            infer(&ctx, &backend, jobs, &stop).await;
        }
    }
}

/// Runs one batch on the model and fans the edited images out to [`finish`]; a failed batch
/// of several jobs is retried one job at a time before anyone is failed.
async fn infer<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: &Arc<Ctx<O, R>>,
    backend: &Backend,
    jobs: Vec<Prepared<D>>,
    stop: &CancellationToken,
) {
    let n = jobs.len();
    let Some(key) = jobs.first().map(|p| p.key) else { return };
    let mut flights = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    for p in jobs {
        requests.push(EditRequest {
            image: p.image,
            instruction: p.job.job.instruction.clone(),
            negative_prompt: p.job.params.negative_prompt.clone(),
            seed: p.job.params.seed,
            guidance_scale: p.job.params.guidance_scale,
            image_guidance_scale: p.job.params.image_guidance_scale,
            init_latents: None,
        });
        flights.push(Some((p.flight, p.job)));
    }
    let batch =
        EditBatch { steps: key.steps, scheduler: Some(key.scheduler), karras_sigmas: key.karras_sigmas, requests };
    ctx.metrics.batch(n);

    // After a stop the running batch gets `shutdown_timeout`, then it is cancelled.
    let cancel = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (cancel, stop, grace) = (cancel.clone(), stop.clone(), ctx.settings.shutdown_timeout);
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
            cancel.store(true, Ordering::Relaxed);
        })
    };
    let requests_backup = if n > 1 { Some(batch.requests.clone()) } else { None };
    // Images dropped between steps (cancelled) are reported at once and settled while their
    // batch-mates run on.
    let (dropped_tx, mut dropped) = mpsc::channel::<usize>(n);
    let hooks = ctx.hooks(&flights, batch.steps, dropped_tx);
    let edit = backend.edit(batch, ctx.settings.job_timeout, cancel, hooks);
    tokio::pin!(edit);
    let result = loop {
        tokio::select! {
            result = &mut edit => break result,
            Some(i) = dropped.recv() => ctx.cancel_dropped(&mut flights, i),
        }
    };
    while let Ok(i) = dropped.try_recv() {
        ctx.cancel_dropped(&mut flights, i);
    }
    watchdog.abort();

    // An editor that answers with another number of images than it was asked for is broken:
    // the batch fails as a model failure (zip would leave the extra deliveries unsettled).
    let result = result.and_then(|output| {
        if output.images.len() == n {
            Ok(output)
        } else {
            Err(EditError {
                kind: EditErrorKind::Model,
                message: format!("the model returned {} images for {n} requests", output.images.len()),
            })
        }
    });
    match result {
        Ok(output) => {
            for (i, edited) in output.images.into_iter().enumerate() {
                match edited {
                    Some(edited) => {
                        let Some((mut flight, job)) = flights[i].take() else { continue };
                        flight.record(&ctx.metrics, Stage::Inference, output.seconds);
                        ctx.tasks.spawn(finish(ctx.clone(), flight, job, edited));
                    }
                    // Dropped between denoising steps (settled above, unless the report was lost).
                    None => ctx.cancel_dropped(&mut flights, i),
                }
            }
        }
        Err(e) if e.kind == EditErrorKind::Cancelled => {
            for (flight, _) in flights.into_iter().flatten() {
                ctx.release(flight);
            }
        }
        Err(e) if e.kind == EditErrorKind::Model && n > 1 => {
            tracing::warn!(error = %e, jobs = n, "batch failed; retrying its jobs one at a time");
            let requests = requests_backup.expect("kept for batches of several");
            for (slot, request) in flights.into_iter().zip(requests) {
                let Some((flight, job)) = slot else { continue };
                let single = Prepared { flight, job, image: request.image, key };
                Box::pin(infer(ctx, backend, vec![single], stop)).await;
            }
        }
        Err(e) => {
            let error = failure::edit(&e);
            for (flight, job) in flights.into_iter().flatten() {
                let (ctx, error) = (ctx.clone(), error.clone());
                ctx.tasks.clone().spawn(async move { ctx.fail(flight, Some(&job), error).await });
            }
        }
    }
}

// --- finish: encode, upload ------------------------------------------------------------------

/// The safety verdict, encode → upload, then the success settlement, for one edited image.
async fn finish<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: Arc<Ctx<O, R>>,
    mut flight: InFlight<D>,
    job: ValidJob,
    edited: EditedImage,
) {
    let size = edited.image.dimensions();
    if edited.instruction_truncated {
        tracing::warn!(job_id = %job.job.job_id, "instruction longer than 77 CLIP tokens; its end was ignored");
    }
    flight.nsfw_content_detected = edited.nsfw_content_detected;
    if edited.nsfw_content_detected == Some(true) {
        ctx.metrics.nsfw_flagged();
        if ctx.settings.block_nsfw {
            return ctx.fail(flight, Some(&job), failure::blocked_nsfw()).await;
        }
        tracing::warn!(job_id = %job.job.job_id, "the safety checker flagged the edited image; the output is black");
    }

    if ctx.cancelled(&job) {
        return ctx.cancel(flight, &job, "before its upload").await;
    }
    let started = Instant::now();
    let (format, quality) = (job.params.format, job.params.quality);
    let bytes = match tokio::task::spawn_blocking(move || imaging::encode(&edited.image, format, quality)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return ctx.fail(flight, Some(&job), failure::image(e)).await,
        Err(e) => return ctx.fail(flight, Some(&job), failure::crashed(Object::Output, &e)).await,
    };
    flight.record(&ctx.metrics, Stage::Encode, seconds(started));

    let mut metadata = BTreeMap::from([
        (meta::JOB_ID.to_string(), job.job.job_id.clone()),
        (meta::SEED.to_string(), job.params.seed.to_string()),
        (meta::MODEL.to_string(), ctx.model.name.clone()),
        (meta::WIDTH.to_string(), size.0.to_string()),
        (meta::HEIGHT.to_string(), size.1.to_string()),
    ]);
    if let Some(nsfw) = flight.nsfw_content_detected {
        metadata.insert(meta::NSFW.to_string(), nsfw.to_string());
    }
    let started = Instant::now();
    let n = bytes.len();
    if let Err(e) = ctx.store.put(&job.output, bytes, format.content_type(), &metadata).await {
        return ctx.fail(flight, Some(&job), failure::storage(Object::Output, e)).await;
    }
    flight.record(&ctx.metrics, Stage::Upload, seconds(started));
    ctx.metrics.output_bytes(n);
    ctx.succeed(flight, &job, size, false).await;
}

// --- settle: publish the result, then ack / retry / dead-letter / release --------------------

/// What every stage shares.
struct Ctx<O, R> {
    /// The engine's knobs.
    settings: EngineSettings,
    /// Delays before retries of transient failures (from the settings).
    retry: Backoff,
    /// Where sources are read and outputs written.
    store: Arc<O>,
    /// Where results go.
    sink: Arc<R>,
    /// Every metric, the outcome counts included.
    metrics: Arc<Metrics>,
    /// The loaded model's facts.
    model: ModelInfo,
    /// Cancel requests and the webhook policy.
    control: Control,
    /// Progress events for the publishing task (bounded; full = dropped).
    events: mpsc::Sender<(JobEvent, Option<String>)>,
    /// The finish and settlement tasks, awaited on drain.
    tasks: TaskTracker,
}

impl<O: ObjectStore, R: ResultSink> Ctx<O, R> {
    /// Whether `job` (or its campaign) is cancelled.
    fn cancelled(&self, job: &ValidJob) -> bool {
        self.control.cancels.is_cancelled(&job.job.job_id, job.job.campaign_id.as_deref())
    }

    /// The job's webhook is usable here: webhooks are enabled and its host is allowed.
    fn check_webhook(&self, job: &ValidJob) -> Result<(), JobError> {
        let Some(hook) = &job.job.webhook else { return Ok(()) };
        let policy = &self.control.webhooks;
        if !policy.enabled {
            return Err(failure::webhook("this worker has no webhook secret configured (webhooks.secret)".into()));
        }
        policy.allow.check(&hook.url, policy.allow_http).map(drop).map_err(|e| failure::webhook(e.to_string()))
    }

    /// The webhook URL results of `job` go to, if any.
    fn webhook<'j>(&self, job: Option<&'j ValidJob>) -> Option<&'j str> {
        job?.job.webhook.as_ref().filter(|_| self.control.webhooks.enabled).map(|w| w.url.as_str())
    }

    /// Sends an event if the buffer has room (else counts it dropped).
    fn emit(&self, event: JobEvent, reply_to: Option<String>) {
        if self.events.try_send((event, reply_to)).is_err() {
            self.metrics.event_dropped();
        }
    }

    /// A job's event at this moment.
    fn event(
        &self,
        job: &ValidJob,
        event: EventType,
        step: usize,
        steps: usize,
        batch_size: usize,
        elapsed: f64,
    ) -> JobEvent {
        JobEvent {
            version: PROTOCOL_VERSION,
            event,
            job_id: job.job.job_id.clone(),
            campaign_id: job.job.campaign_id.clone(),
            step: u32::try_from(step).unwrap_or(u32::MAX),
            steps: u32::try_from(steps).unwrap_or(u32::MAX),
            batch_size: u32::try_from(batch_size).unwrap_or(u32::MAX),
            elapsed,
            worker: self.settings.worker_name.clone(),
            at: retouch_core::time::now_rfc3339(),
        }
    }

    /// The batch's hooks: `started` now, throttled `progress` from the model thread for the
    /// jobs that asked for it, and the per-step cancel check.
    /// `flights` are the batch's jobs in request order; each image the hooks drop is reported on
    /// `dropped`.
    fn hooks<D: Delivery>(
        self: &Arc<Self>,
        flights: &[Option<(InFlight<D>, ValidJob)>],
        steps: u32,
        dropped: mpsc::Sender<usize>,
    ) -> BatchHooks {
        let n = flights.len();
        let ids: Vec<Option<(String, Option<String>)>> = flights
            .iter()
            .map(|f| f.as_ref().map(|(_, j)| (j.job.job_id.clone(), j.job.campaign_id.clone())))
            .collect();
        // (index, job, reply_to) of the jobs that want progress.
        let listeners: Vec<(usize, ValidJob, Option<String>)> = flights
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|(flight, job)| (i, flight, job)))
            .filter(|(_, _, job)| job.job.wants_progress())
            .map(|(i, flight, job)| (i, job.clone(), flight.delivery.info().reply_to.clone()))
            .collect();
        for (_, job, reply_to) in &listeners {
            self.emit(self.event(job, EventType::Started, 0, steps as usize, n, 0.0), reply_to.clone());
        }
        let drop_image = {
            let ctx = self.clone();
            Box::new(move |i: usize| {
                let cancelled = ids
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|(id, c)| ctx.control.cancels.is_cancelled(id, c.as_deref()));
                if cancelled {
                    // Capacity n: one report per image at most, never full.
                    let _ = dropped.try_send(i);
                }
                cancelled
            })
        };
        if listeners.is_empty() {
            return BatchHooks { drop_image, ..BatchHooks::default() };
        }
        let ctx = self.clone();
        let mut last_sent: Option<Instant> = None;
        let on_step = Box::new(move |step: usize, total: usize, elapsed: Duration, running: &[bool]| {
            let now = Instant::now();
            let due = step == total || last_sent.is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL);
            if !due {
                return;
            }
            last_sent = Some(now);
            for (i, job, reply_to) in &listeners {
                if running.get(*i).copied().unwrap_or(false) {
                    let event = ctx.event(job, EventType::Progress, step, total, n, elapsed.as_secs_f64());
                    ctx.emit(event, reply_to.clone());
                }
            }
        });
        BatchHooks { on_step, drop_image }
    }

    /// Settles image `i` of a running batch, dropped because it was cancelled (once: its slot
    /// is emptied).
    fn cancel_dropped<D: Delivery>(self: &Arc<Self>, flights: &mut [Option<(InFlight<D>, ValidJob)>], i: usize) {
        if let Some((flight, job)) = flights.get_mut(i).and_then(Option::take) {
            let ctx = self.clone();
            self.tasks.spawn(async move { ctx.cancel(flight, &job, "during its model call").await });
        }
    }

    /// Settles a cancelled job: a `cancelled` result (no output was or will be written), then
    /// the ack.
    async fn cancel<D: Delivery>(&self, mut flight: InFlight<D>, job: &ValidJob, when: &str) {
        flight.timings.total = seconds(flight.received);
        let info = flight.delivery.info().clone();
        let mut result = self.result(&flight, &info, Some(job));
        result.status = Status::Cancelled;
        if self.publish_and_ack(flight, job, &result, Outcome::Cancelled).await {
            tracing::info!(job_id = %job.job.job_id, when, "job cancelled");
        }
    }

    /// The end of every settlement that leaves the job done: the result (and its copies)
    /// confirmed, the outcome counted, the ack. A result that cannot be published turns into
    /// a failure (retried while attempts remain); then this answers `false`.
    async fn publish_and_ack<D: Delivery>(
        &self,
        flight: InFlight<D>,
        job: &ValidJob,
        result: &JobResult,
        outcome: Outcome,
    ) -> bool {
        let info = flight.delivery.info();
        let published = Instant::now();
        if let Err(e) = self.sink.publish(result, info, self.webhook(Some(job))).await {
            self.fail(flight, Some(job), failure::unpublished(&e)).await;
            return false;
        }
        self.metrics.stage(Stage::Publish, seconds(published));
        self.metrics.settled(outcome, None, flight.timings.total);
        let InFlight { delivery, _slot, .. } = flight;
        if let Err(e) = delivery.ack().await {
            tracing::warn!(job_id = %job.job.job_id, error = %e, "ack lost; the job will come back (a duplicate, or cancelled again)");
        }
        true
    }

    /// Publishes a success (or duplicate) result, then acks.
    async fn succeed<D: Delivery>(&self, mut flight: InFlight<D>, job: &ValidJob, size: (u32, u32), duplicate: bool) {
        flight.timings.total = seconds(flight.received);
        let info = flight.delivery.info().clone();
        let mut result = self.result(&flight, &info, Some(job));
        result.output = Some(job.output.to_string());
        (result.width, result.height) = (Some(size.0), Some(size.1));
        result.duplicate = duplicate;
        let outcome = if duplicate { Outcome::Duplicate } else { Outcome::Succeeded };
        let seconds = flight.timings.total;
        if self.publish_and_ack(flight, job, &result, outcome).await {
            tracing::info!(job_id = %job.job.job_id, output = %job.output, duplicate, seconds, "job done");
        }
    }

    /// The one place a failure becomes a disposition: a retryable error before the delivery
    /// limit goes back to the queue after a backoff; anything else gets a failure result and a
    /// dead letter.
    async fn fail<D: Delivery>(&self, mut flight: InFlight<D>, job: Option<&ValidJob>, error: JobError) {
        flight.timings.total = seconds(flight.received);
        let info = flight.delivery.info().clone();
        let job_id = job.map_or_else(
            || flight.envelope.job_id.clone().or_else(|| info.message_id.clone()).unwrap_or_default(),
            |j| j.job.job_id.clone(),
        );
        if error.retryable && !info.last_attempt {
            let delay = self.retry.delay(info.attempt.saturating_sub(1));
            tracing::warn!(job_id, attempt = info.attempt, kind = %error.kind, error = %error.message,
                retry_in = ?delay, "transient failure; retrying");
            self.metrics.settled(Outcome::Retried, Some(error.kind), flight.timings.total);
            let InFlight { delivery, _slot, .. } = flight;
            if let Err(e) = delivery.retry(delay).await {
                tracing::warn!(job_id, error = %e, "could not return the job to the queue");
            }
            return;
        }
        tracing::error!(job_id, attempt = info.attempt, kind = %error.kind, error = %error.message,
            final_attempt = info.last_attempt, "job failed; dead-lettering");
        let mut result = self.result(&flight, &info, job);
        result.status = Status::Failed;
        result.error =
            Some(ResultError { kind: error.kind, message: error.message.clone(), retryable: error.retryable });
        if let Err(e) = self.sink.publish(&result, &info, self.webhook(job)).await {
            tracing::error!(job_id, error = %e, "could not publish the failure result");
        }
        self.metrics.settled(Outcome::Failed, Some(error.kind), flight.timings.total);
        let InFlight { delivery, _slot, .. } = flight;
        if let Err(e) = delivery.dead_letter(&error).await {
            tracing::error!(job_id, error = %e, "could not dead-letter the job");
        }
    }

    /// Gives an unstarted job back to the queue (shutdown), without spending an attempt.
    fn release<D: Delivery>(&self, flight: InFlight<D>) {
        self.metrics.settled(Outcome::Released, None, 0.0);
        let InFlight { delivery, _slot: slot, .. } = flight;
        self.tasks.spawn(async move {
            let _slot = slot;
            if let Err(e) = delivery.release().await {
                tracing::warn!(error = %e, "could not give a job back; the broker will redeliver it");
            }
        });
    }

    /// The result every settlement starts from: a success without an output yet.
    fn result<D: Delivery>(&self, flight: &InFlight<D>, info: &DeliveryInfo, job: Option<&ValidJob>) -> JobResult {
        JobResult {
            version: PROTOCOL_VERSION,
            job_id: job
                .map(|j| j.job.job_id.clone())
                .or_else(|| flight.envelope.job_id.clone())
                .or_else(|| info.message_id.clone())
                .unwrap_or_default(),
            campaign_id: job.map_or_else(|| flight.envelope.campaign_id.clone(), |j| j.job.campaign_id.clone()),
            status: Status::Succeeded,
            source: job.map(|j| j.source.to_string()),
            output: None,
            width: None,
            height: None,
            seed: job.map(|j| j.params.seed),
            attempt: info.attempt,
            duplicate: false,
            nsfw_content_detected: flight.nsfw_content_detected,
            worker: self.settings.worker_name.clone(),
            model: self.model.name.clone(),
            timings: flight.timings.clone(),
            error: None,
            metadata: job.and_then(|j| j.job.metadata.clone()),
        }
    }
}

// --- the pieces a delivery carries through its life ------------------------------------------

/// A delivery being worked on: owns its concurrency permit and in-flight gauge slot until
/// it is settled.
struct InFlight<D> {
    /// The broker's (or the local queue's) delivery, settled exactly once.
    delivery: D,
    /// When it was received; `timings.total` counts from here.
    received: Instant,
    /// The stage times reported in its result.
    timings: Timings,
    /// The safety checker's verdict once the model (or an earlier delivery's output) gave one.
    nsfw_content_detected: Option<bool>,
    /// What could be read of an invalid job (its id and campaign), for its failure result.
    envelope: Envelope,
    /// Returned on drop, i.e. when the delivery is settled.
    _slot: Slot,
}

impl<D> InFlight<D> {
    fn new(delivery: D, slot: Slot) -> Self {
        Self {
            delivery,
            received: Instant::now(),
            timings: Timings::default(),
            nsfw_content_detected: None,
            envelope: Envelope::default(),
            _slot: slot,
        }
    }

    /// Records a finished stage's duration: in the job's timings (its result) and in the stage
    /// histogram.
    fn record(&mut self, metrics: &Metrics, stage: Stage, secs: f64) {
        match stage {
            Stage::QueueWait => self.timings.queue_wait = Some(secs),
            Stage::Fetch => self.timings.fetch = secs,
            Stage::Decode => self.timings.decode = secs,
            Stage::Inference => self.timings.inference = secs,
            Stage::Encode => self.timings.encode = secs,
            Stage::Upload => self.timings.upload = secs,
            // Not a field of a result: the result is what is being published.
            Stage::Publish => {}
        }
        metrics.stage(stage, secs);
    }
}

/// Holds a concurrency permit and one unit of `retouch_jobs_in_flight`; both are returned on
/// drop, i.e. when the delivery is settled.
struct Slot {
    /// One of the engine's `concurrency` permits.
    _permit: OwnedSemaphorePermit,
    /// For the in-flight gauge.
    metrics: Arc<Metrics>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.in_flight().inc();
        Self { _permit: permit, metrics }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.in_flight().dec();
    }
}

/// A job ready for the model.
struct Prepared<D> {
    /// Its delivery.
    flight: InFlight<D>,
    /// The validated job.
    job: ValidJob,
    /// The decoded, resized source.
    image: RgbImage,
    /// What it can share a model call with.
    key: BatchKey,
}

impl<D: Delivery> Batchable for Prepared<D> {
    fn key(&self) -> BatchKey {
        self.key
    }

    fn urgent(&self) -> bool {
        self.flight.delivery.info().priority == Priority::High || self.job.job.priority() == Priority::High
    }
}

/// Least time between two `progress` events of a job (the last step is always sent).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

fn seconds(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}
