//! The job engine: a job's life, stage by stage.
//!
//! ```text
//! receive ─▶ validate ─▶ output exists? ─▶ fetch ─▶ decode ─▶ batch ─▶ infer ─▶ encode ─▶ upload ─▶ publish ─▶ ack
//!            │            └─ yes: publish duplicate, ack                                         (failures: retry or
//!            └─ invalid: failure result + dead letter                                             failure result + dead letter)
//! ```
//!
//! Concurrency, and why every queue is bounded:
//! * a semaphore of `concurrency` permits (= the broker prefetch) bounds deliveries in flight;
//!   each delivery holds one permit until it is settled;
//! * one task per delivery fetches and decodes, so the next batch is prepared while the model
//!   works; prepared jobs reach the batcher through a channel of `concurrency` slots;
//! * the batcher hands batches to the dispatcher through a channel of capacity 1, and the
//!   dispatcher to the model thread one batch at a time;
//! * each finished image gets its own task for encode → upload → publish → ack, overlapping the
//!   next inference.
//!
//! Settlement decisions live in one place ([`Ctx::fail`]): transient errors are retried with
//! exponential backoff until the delivery limit, then — like permanent errors — answered with a
//! failure result and a dead letter. Shutdown stops receiving, gives back every job whose model
//! call has not started, lets the running batch finish within `shutdown_timeout` (else gives its
//! jobs back too), and waits for the uploads, results and acks in progress.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use retouch_core::editor::{EditBatch, EditRequest, EditedImage, ModelInfo};
use retouch_core::error::{ErrorKind, JobError};
use retouch_core::imaging::{self, DecodeLimits, ImageError};
use retouch_core::job::{JobResult, PROTOCOL_VERSION, ResultError, Status, Timings, ValidJob, parse_job};
use retouch_core::queue::{Delivery, DeliveryInfo, JobSource, ResultSink};
use retouch_core::store::ObjectStore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, InferError};
use crate::batcher::{self, BatchKey, BatchPolicy, Batchable};
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

/// The engine's knobs (a subset of the worker config, so tests and local mode can build it).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Default output location prefix.
    pub output_prefix: String,
    /// Deliveries in flight (the broker prefetch).
    pub concurrency: usize,
    /// Batching rules.
    pub batch: BatchPolicy,
    /// Deadline of one model call.
    pub job_timeout: Duration,
    /// Time the running batch gets to finish after a stop.
    pub shutdown_timeout: Duration,
    /// Input limits.
    pub limits: DecodeLimits,
    /// First retry delay; doubles per attempt.
    pub retry_backoff: Duration,
    /// Retry delay cap.
    pub retry_backoff_max: Duration,
    /// Name in results.
    pub worker_name: String,
    /// Fail a job whose image the safety checker flagged (`nsfw`, permanent: failure result and
    /// dead letter, no output) instead of writing the black image (the `block` policy).
    pub block_nsfw: bool,
}

/// Counts of how deliveries were settled during a run.
#[derive(Debug, Default)]
pub struct Summary {
    /// Outputs written.
    pub succeeded: AtomicU64,
    /// Outputs found from an earlier delivery.
    pub duplicate: AtomicU64,
    /// Returned for another attempt.
    pub retried: AtomicU64,
    /// Dead-lettered with a failure result.
    pub failed: AtomicU64,
    /// Given back unstarted at shutdown.
    pub released: AtomicU64,
}

/// Errors that end the engine (not a job).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model never became ready.
    #[error("model unavailable: {0}")]
    Model(String),
}

/// What every stage shares.
struct Ctx<O, R> {
    settings: EngineSettings,
    store: Arc<O>,
    sink: Arc<R>,
    metrics: Arc<Metrics>,
    model: ModelInfo,
    summary: Arc<Summary>,
    tasks: TaskTracker,
}

/// A delivery being worked on: owns its concurrency permit and in-flight gauge slot until
/// it is settled.
struct InFlight<D> {
    delivery: D,
    received: Instant,
    timings: Timings,
    /// The safety checker's verdict once the model (or an earlier delivery's output) gave one.
    nsfw_content_detected: Option<bool>,
    _slot: Slot,
}

/// Holds a concurrency permit and one unit of `retouch_jobs_in_flight`; both are returned on
/// drop, i.e. when the delivery is settled.
struct Slot {
    _permit: OwnedSemaphorePermit,
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
    flight: InFlight<D>,
    job: ValidJob,
    image: RgbImage,
    key: BatchKey,
}

impl<D: Delivery> Batchable for Prepared<D> {
    fn key(&self) -> BatchKey {
        self.key
    }
}

fn seconds(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

impl<O: ObjectStore, R: ResultSink> Ctx<O, R> {
    fn result(&self, flight_info: &DeliveryInfo, job: Option<&ValidJob>, timings: &Timings) -> JobResult {
        JobResult {
            version: PROTOCOL_VERSION,
            job_id: job.map(|j| j.job.job_id.clone()).or_else(|| flight_info.message_id.clone()).unwrap_or_default(),
            campaign_id: job.and_then(|j| j.job.campaign_id.clone()),
            status: Status::Succeeded,
            source: job.map(|j| j.source.to_string()),
            output: None,
            width: None,
            height: None,
            seed: job.map(|j| j.params.seed),
            attempt: flight_info.attempt,
            duplicate: false,
            nsfw_content_detected: None,
            worker: self.settings.worker_name.clone(),
            model: self.model.name.clone(),
            timings: timings.clone(),
            error: None,
            metadata: job.and_then(|j| j.job.metadata.clone()),
        }
    }

    fn retry_delay(&self, attempt: u32) -> Duration {
        let base = self.settings.retry_backoff.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
        let capped = base.min(self.settings.retry_backoff_max.as_secs_f64());
        // ±20 % jitter so retries of one burst do not return together.
        let jitter = 0.8
            + 0.4
                * (SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 1000)
                    as f64
                / 1000.0;
        Duration::from_secs_f64(capped * jitter)
    }

    /// The one place a failure becomes a disposition.
    async fn fail<D: Delivery>(&self, mut flight: InFlight<D>, job: Option<&ValidJob>, error: JobError) {
        flight.timings.total = seconds(flight.received);
        let info = flight.delivery.info().clone();
        let job_id = job.map_or_else(|| info.message_id.clone().unwrap_or_default(), |j| j.job.job_id.clone());
        if error.retryable && !info.last_attempt {
            let delay = self.retry_delay(info.attempt);
            tracing::warn!(job_id, attempt = info.attempt, kind = %error.kind, error = %error.message,
                retry_in = ?delay, "transient failure; retrying");
            self.metrics.settled(Outcome::Retried, Some(error.kind), flight.timings.total);
            self.summary.retried.fetch_add(1, Ordering::Relaxed);
            let InFlight { delivery, _slot, .. } = flight;
            if let Err(e) = delivery.retry(delay).await {
                tracing::warn!(job_id, error = %e, "could not return the job to the queue");
            }
            return;
        }
        tracing::error!(job_id, attempt = info.attempt, kind = %error.kind, error = %error.message,
            final_attempt = info.last_attempt, "job failed; dead-lettering");
        let mut result = self.result(&info, job, &flight.timings);
        result.nsfw_content_detected = flight.nsfw_content_detected;
        result.status = Status::Failed;
        result.error =
            Some(ResultError { kind: error.kind, message: error.message.clone(), retryable: error.retryable });
        if let Err(e) = self.sink.publish(&result, &info).await {
            tracing::error!(job_id, error = %e, "could not publish the failure result");
        }
        self.metrics.settled(Outcome::Failed, Some(error.kind), flight.timings.total);
        self.summary.failed.fetch_add(1, Ordering::Relaxed);
        let InFlight { delivery, _slot, .. } = flight;
        if let Err(e) = delivery.dead_letter(&error).await {
            tracing::error!(job_id, error = %e, "could not dead-letter the job");
        }
    }

    /// Publishes a success (or duplicate) result, then acks.
    async fn succeed<D: Delivery>(&self, mut flight: InFlight<D>, job: &ValidJob, size: (u32, u32), duplicate: bool) {
        flight.timings.total = seconds(flight.received);
        let info = flight.delivery.info().clone();
        let mut result = self.result(&info, Some(job), &flight.timings);
        result.nsfw_content_detected = flight.nsfw_content_detected;
        result.output = Some(job.output.to_string());
        (result.width, result.height) = (Some(size.0), Some(size.1));
        result.duplicate = duplicate;
        let published = Instant::now();
        if let Err(e) = self.sink.publish(&result, &info).await {
            // The output exists: another delivery will find it and publish a duplicate result.
            return self
                .fail(flight, Some(job), JobError::transient(ErrorKind::Internal, format!("result not published: {e}")))
                .await;
        }
        self.metrics.stage(Stage::Publish, seconds(published));
        let outcome = if duplicate { Outcome::Duplicate } else { Outcome::Succeeded };
        self.metrics.settled(outcome, None, flight.timings.total);
        let counter = if duplicate { &self.summary.duplicate } else { &self.summary.succeeded };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(job_id = %job.job.job_id, output = %job.output, duplicate, seconds = flight.timings.total, "job done");
        let InFlight { delivery, _slot, .. } = flight;
        if let Err(e) = delivery.ack().await {
            tracing::warn!(job_id = %job.job.job_id, error = %e, "ack lost; the job will come back as a duplicate");
        }
    }

    fn release<D: Delivery>(&self, flight: InFlight<D>) {
        self.metrics.settled(Outcome::Released, None, 0.0);
        self.summary.released.fetch_add(1, Ordering::Relaxed);
        let InFlight { delivery, _slot: slot, .. } = flight;
        self.tasks.spawn(async move {
            let _slot = slot;
            if let Err(e) = delivery.release().await {
                tracing::warn!(error = %e, "could not give a job back; the broker will redeliver it");
            }
        });
    }
}

fn image_error(e: ImageError) -> JobError {
    match e {
        ImageError::TooLarge(m) => JobError::new(ErrorKind::ImageTooLarge, m),
        ImageError::Invalid(m) | ImageError::TooSmall(m) => JobError::new(ErrorKind::InvalidImage, m),
        ImageError::Encode(m) => JobError::new(ErrorKind::Internal, m),
    }
}

/// Receive → validate → duplicate check → fetch → decode, then hand over to the batcher.
async fn prepare<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: Arc<Ctx<O, R>>,
    mut flight: InFlight<D>,
    to_batcher: mpsc::Sender<Prepared<D>>,
    stop: CancellationToken,
) {
    if let Some(published) = flight.delivery.info().published_at
        && let Ok(wait) = SystemTime::now().duration_since(published)
    {
        flight.timings.queue_wait = Some(wait.as_secs_f64());
        ctx.metrics.stage(Stage::QueueWait, wait.as_secs_f64());
    }
    let job = match parse_job(flight.delivery.body()).and_then(|j| j.validate(&ctx.settings.output_prefix)) {
        Ok(job) => job,
        Err(e) => return ctx.fail(flight, None, e).await,
    };
    match ctx.store.head(&job.output).await {
        Ok(Some(existing)) if existing.metadata.get(meta::JOB_ID) == Some(&job.job.job_id) => {
            let dim = |k: &str| existing.metadata.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            let size = (dim(meta::WIDTH), dim(meta::HEIGHT));
            flight.nsfw_content_detected = existing.metadata.get(meta::NSFW).and_then(|v| v.parse().ok());
            return ctx.succeed(flight, &job, size, true).await;
        }
        Ok(Some(_)) => tracing::warn!(output = %job.output, "the output exists from another job; it will be replaced"),
        Ok(None) => {}
        Err(e) => return ctx.fail(flight, Some(&job), e.for_output()).await,
    }
    if stop.is_cancelled() {
        return ctx.release(flight);
    }

    let fetch_started = Instant::now();
    let bytes = match ctx.store.get(&job.source, ctx.settings.limits.max_bytes).await {
        Ok(bytes) => bytes,
        Err(e) => return ctx.fail(flight, Some(&job), e.for_source()).await,
    };
    flight.timings.fetch = seconds(fetch_started);
    ctx.metrics.stage(Stage::Fetch, flight.timings.fetch);
    ctx.metrics.input_bytes(bytes.len());

    let decode_started = Instant::now();
    let (limits, max_side, multiple) = (ctx.settings.limits, job.params.max_side, ctx.model.size_multiple);
    let decoded = tokio::task::spawn_blocking(move || imaging::prepare(&bytes, limits, max_side, multiple)).await;
    let image = match decoded {
        Ok(Ok(d)) => d.image,
        Ok(Err(e)) => return ctx.fail(flight, Some(&job), image_error(e)).await,
        Err(e) => {
            return ctx
                .fail(flight, Some(&job), JobError::new(ErrorKind::InvalidImage, format!("decoder crashed: {e}")))
                .await;
        }
    };
    flight.timings.decode = seconds(decode_started);
    ctx.metrics.stage(Stage::Decode, flight.timings.decode);
    if stop.is_cancelled() {
        return ctx.release(flight);
    }

    let Some(scheduler) = job.params.scheduler.or(ctx.model.default_scheduler) else {
        let e =
            JobError::new(ErrorKind::InvalidJob, "the checkpoint's scheduler is not implemented; set params.scheduler");
        return ctx.fail(flight, Some(&job), e).await;
    };
    if job.params.karras_sigmas == Some(true) && !scheduler.supports_karras_sigmas() {
        let e = JobError::new(
            ErrorKind::InvalidJob,
            format!("params.karras_sigmas: the checkpoint's scheduler {scheduler} has no Karras sigmas"),
        );
        return ctx.fail(flight, Some(&job), e).await;
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

/// Encode → upload → publish → ack for one edited image.
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
            let e = JobError::new(
                ErrorKind::Nsfw,
                "the safety checker flagged the edited image; no output was written (safety_checker = block)",
            );
            return ctx.fail(flight, Some(&job), e).await;
        }
        tracing::warn!(job_id = %job.job.job_id, "the safety checker flagged the edited image; the output is black");
    }
    let encode_started = Instant::now();
    let (format, quality) = (job.params.format, job.params.quality);
    let encoded = tokio::task::spawn_blocking(move || imaging::encode(&edited.image, format, quality)).await;
    let bytes = match encoded {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return ctx.fail(flight, Some(&job), image_error(e)).await,
        Err(e) => {
            return ctx
                .fail(flight, Some(&job), JobError::new(ErrorKind::Internal, format!("encoder crashed: {e}")))
                .await;
        }
    };
    flight.timings.encode = seconds(encode_started);
    ctx.metrics.stage(Stage::Encode, flight.timings.encode);

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
    let upload_started = Instant::now();
    let n = bytes.len();
    if let Err(e) = ctx.store.put(&job.output, bytes, format.content_type(), &metadata).await {
        return ctx.fail(flight, Some(&job), e.for_output()).await;
    }
    flight.timings.upload = seconds(upload_started);
    ctx.metrics.stage(Stage::Upload, flight.timings.upload);
    ctx.metrics.output_bytes(n);
    ctx.succeed(flight, &job, size, false).await;
}

/// Runs one batch on the model and fans the results out; a failed batch of several jobs is
/// retried one job at a time before anyone is failed.
async fn infer<D: Delivery, O: ObjectStore, R: ResultSink>(
    ctx: &Arc<Ctx<O, R>>,
    backend: &Backend,
    jobs: Vec<Prepared<D>>,
    stop: &CancellationToken,
) {
    let n = jobs.len();
    let first = jobs.first().map(|p| p.key);
    let Some(key) = first else { return };
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
        flights.push((p.flight, p.job));
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
    let result = backend.edit(batch, ctx.settings.job_timeout, cancel).await;
    watchdog.abort();

    match result {
        Ok(output) => {
            for ((mut flight, job), edited) in flights.into_iter().zip(output.images) {
                flight.timings.inference = output.seconds;
                ctx.metrics.stage(Stage::Inference, output.seconds);
                ctx.tasks.spawn(finish(ctx.clone(), flight, job, edited));
            }
        }
        Err(InferError::Model(message)) if n > 1 => {
            tracing::warn!(error = %message, jobs = n, "batch failed; retrying its jobs one at a time");
            let requests = requests_backup.expect("kept for batches of several");
            for ((flight, job), request) in flights.into_iter().zip(requests) {
                let single = Prepared { flight, job, image: request.image, key };
                Box::pin(infer(ctx, backend, vec![single], stop)).await;
            }
        }
        Err(InferError::Cancelled) => {
            for (flight, _) in flights {
                ctx.release(flight);
            }
        }
        Err(e) => {
            let error = match &e {
                InferError::Invalid(m) => JobError::new(ErrorKind::InvalidJob, m.clone()),
                InferError::Timeout(_) => JobError::new(ErrorKind::Timeout, e.to_string()),
                InferError::Model(m) => JobError::transient(ErrorKind::Model, m.clone()),
                InferError::Unavailable(m) => JobError::transient(ErrorKind::Internal, m.clone()),
                InferError::Cancelled => unreachable!("handled above"),
            };
            for (flight, job) in flights {
                let (ctx, error) = (ctx.clone(), error.clone());
                ctx.tasks.clone().spawn(async move { ctx.fail(flight, Some(&job), error).await });
            }
        }
    }
}

/// Runs the engine until `shutdown` resolves (or a finite source is exhausted), then drains.
///
/// `source.next()` must be cancel-safe (it is raced against `shutdown`).
///
/// # Errors
/// [`EngineError::Model`] when the model never becomes ready.
pub async fn run<S, O, R>(
    settings: EngineSettings,
    mut source: S,
    store: Arc<O>,
    sink: Arc<R>,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Arc<Summary>, EngineError>
where
    S: JobSource,
    O: ObjectStore,
    R: ResultSink,
{
    let model = backend.ready().await.map_err(EngineError::Model)?;
    let concurrency = settings.concurrency.max(1);
    let policy = settings.batch;
    let summary = Arc::new(Summary::default());
    let tasks = TaskTracker::new();
    let ctx = Arc::new(Ctx {
        settings,
        store,
        sink,
        metrics: metrics.clone(),
        model,
        summary: summary.clone(),
        tasks: tasks.clone(),
    });
    let stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(concurrency));

    // Prepared jobs wait here for the batcher: at most one per delivery in flight.
    let (to_batcher, batcher_rx) = mpsc::channel::<Prepared<S::Delivery>>(concurrency);
    // One ready batch waits while the model runs another.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Prepared<S::Delivery>>>(1);
    let batcher_task = {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tokio::spawn(batcher::run(policy, batcher_rx, batch_tx, stop, move |p: Prepared<S::Delivery>| {
            ctx.release(p.flight)
        }))
    };
    let dispatcher_task = {
        let (ctx, stop, backend) = (ctx.clone(), stop.clone(), backend.clone());
        tokio::spawn(async move {
            while let Some(batch) = batch_rx.recv().await {
                if stop.is_cancelled() {
                    batch.into_iter().for_each(|p| ctx.release(p.flight));
                    continue;
                }
                infer(&ctx, &backend, batch, &stop).await;
            }
        })
    };

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
                let flight = InFlight {
                    delivery,
                    received: Instant::now(),
                    timings: Timings::default(),
                    nsfw_content_detected: None,
                    _slot: Slot::new(permit, metrics.clone()),
                };
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
    Ok(summary)
}
