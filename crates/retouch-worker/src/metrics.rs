//! Every Prometheus metric of the worker, in one place.
//!
//! Conventions: prefix `retouch_`, base units (`_seconds`, `_bytes`), `_total` on counters,
//! small closed label sets (`outcome`, `error_kind`, `stage`), every label combination
//! pre-initialised to 0 so rates and alerts work from the first scrape. Duration buckets span
//! 10 ms to 10 min: CPU edits take minutes, GPU edits seconds, storage calls milliseconds.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use retouch_core::error::ErrorKind;
use retouch_core::queue::QueueCounters;

/// Duration buckets (seconds): 10 ms … 10 min.
pub const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// How a delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Output written, result published, acked.
    Succeeded,
    /// Output already existed from an earlier delivery; result re-published, acked.
    Duplicate,
    /// Transient failure; returned to the queue for another attempt.
    Retried,
    /// Final failure; failure result published, job dead-lettered.
    Failed,
    /// Never started (shutdown); returned to the queue.
    Released,
    /// Cancelled (`retouch cancel`): `cancelled` result, acked, no output.
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 6] =
        [Self::Succeeded, Self::Duplicate, Self::Retried, Self::Failed, Self::Released, Self::Cancelled];

    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Duplicate => "duplicate",
            Self::Retried => "retried",
            Self::Failed => "failed",
            Self::Released => "released",
            Self::Cancelled => "cancelled",
        }
    }

    fn has_error(self) -> bool {
        matches!(self, Self::Retried | Self::Failed)
    }
}

/// Deliveries settled, per outcome: read from `retouch_jobs_total` ([`Metrics::summary`]),
/// so the counts a run reports and the ones Prometheus scrapes are the same numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Outputs written.
    pub succeeded: u64,
    /// Outputs found from an earlier delivery.
    pub duplicate: u64,
    /// Returned for another attempt.
    pub retried: u64,
    /// Dead-lettered with a failure result.
    pub failed: u64,
    /// Given back unstarted at shutdown.
    pub released: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl Summary {
    /// The settlements between `earlier` and `self` (both from the same metrics).
    #[must_use]
    pub fn since(&self, earlier: &Summary) -> Summary {
        Summary {
            succeeded: self.succeeded.saturating_sub(earlier.succeeded),
            duplicate: self.duplicate.saturating_sub(earlier.duplicate),
            retried: self.retried.saturating_sub(earlier.retried),
            failed: self.failed.saturating_sub(earlier.failed),
            released: self.released.saturating_sub(earlier.released),
            cancelled: self.cancelled.saturating_sub(earlier.cancelled),
        }
    }
}

/// Pipeline stages timed per job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Publication → delivery (needs the AMQP timestamp).
    QueueWait,
    /// Input download.
    Fetch,
    /// Decode, orientation, resize.
    Decode,
    /// The model call of the job's batch.
    Inference,
    /// Output encoding.
    Encode,
    /// Output upload.
    Upload,
    /// Result publication (with confirm).
    Publish,
}

impl Stage {
    const ALL: [Stage; 7] =
        [Self::QueueWait, Self::Fetch, Self::Decode, Self::Inference, Self::Encode, Self::Upload, Self::Publish];

    fn as_str(self) -> &'static str {
        match self {
            Self::QueueWait => "queue_wait",
            Self::Fetch => "fetch",
            Self::Decode => "decode",
            Self::Inference => "inference",
            Self::Encode => "encode",
            Self::Upload => "upload",
            Self::Publish => "publish",
        }
    }
}

/// The worker's metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    dead_letters: IntCounterVec,
    job_duration: Histogram,
    stage_duration: HistogramVec,
    batch_size: Histogram,
    step_duration: Histogram,
    jobs_in_flight: IntGauge,
    model_load_seconds: Gauge,
    model_ready: IntGauge,
    input_bytes: IntCounter,
    output_bytes: IntCounter,
    nsfw_flagged: IntCounter,
    last_success: Gauge,
    gpu_memory_used: IntGauge,
    broker_connected: IntGauge,
    reconnects: IntCounter,
    lost_acks: IntCounter,
    unroutable_results: IntCounter,
    events: IntCounterVec,
    cancel_requests: IntCounter,
    webhook_deliveries: IntCounterVec,
    webhook_duration: Histogram,
    build_info: IntGaugeVec,
    queue: Arc<QueueCounters>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid static histogram")
}

impl Metrics {
    /// Creates and registers every metric. `queue` is read at scrape time for broker state.
    pub fn new(queue: Arc<QueueCounters>) -> Self {
        let registry = Registry::new();
        let jobs = IntCounterVec::new(
            Opts::new("retouch_jobs_total", "Deliveries settled, by outcome and error kind (none for successes)."),
            &["outcome", "error_kind"],
        )
        .expect("valid");
        let dead_letters = IntCounterVec::new(
            Opts::new("retouch_dead_letters_total", "Jobs moved to the dead-letter queue, by error kind."),
            &["error_kind"],
        )
        .expect("valid");
        let job_duration = histogram(
            "retouch_job_duration_seconds",
            "End-to-end time of a delivery, from receipt to settlement.",
            DURATION_BUCKETS,
        );
        let stage_duration = HistogramVec::new(
            HistogramOpts::new("retouch_stage_duration_seconds", "Time spent in each pipeline stage per job.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid");
        let batch_size = histogram(
            "retouch_batch_size",
            "Images per model call.",
            &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0],
        );
        let step_duration = histogram(
            "retouch_denoise_step_duration_seconds",
            "Time of one denoising step of a batch.",
            DURATION_BUCKETS,
        );
        let jobs_in_flight =
            IntGauge::new("retouch_jobs_in_flight", "Deliveries received and not yet settled.").expect("valid");
        let model_load_seconds =
            Gauge::new("retouch_model_load_duration_seconds", "Time the model took to load at start-up.")
                .expect("valid");
        let model_ready = IntGauge::new("retouch_model_ready", "1 once the model is loaded.").expect("valid");
        let input_bytes =
            IntCounter::new("retouch_input_bytes_total", "Bytes of input images downloaded.").expect("valid");
        let output_bytes =
            IntCounter::new("retouch_output_bytes_total", "Bytes of output images uploaded.").expect("valid");
        let nsfw_flagged = IntCounter::new(
            "retouch_nsfw_flagged_total",
            "Edited images the safety checker flagged (written black, or failed with error kind nsfw under block).",
        )
        .expect("valid");
        let last_success = Gauge::new(
            "retouch_last_success_timestamp_seconds",
            "Unix time of the last successful job (0 before the first).",
        )
        .expect("valid");
        let gpu_memory_used =
            IntGauge::new("retouch_gpu_memory_used_bytes", "GPU memory in use on the worker's device (0 on CPU).")
                .expect("valid");
        let broker_connected =
            IntGauge::new("retouch_broker_connected", "1 while the job consumer is connected and subscribed.")
                .expect("valid");
        let reconnects =
            IntCounter::new("retouch_amqp_reconnects_total", "Broker connections re-established after a loss.")
                .expect("valid");
        let lost_acks = IntCounter::new(
            "retouch_amqp_lost_acks_total",
            "Settlements (acks, rejects) that could not reach the broker; those jobs are redelivered.",
        )
        .expect("valid");
        let unroutable_results = IntCounter::new(
            "retouch_results_unroutable_total",
            "Results the broker returned because no queue is bound to the results exchange.",
        )
        .expect("valid");
        let events = IntCounterVec::new(
            Opts::new(
                "retouch_progress_events_total",
                "Progress events (started, progress), by outcome: published, failed (the broker refused), dropped (buffer full).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let cancel_requests = IntCounter::new(
            "retouch_cancel_requests_total",
            "Cancel requests read from the cancel stream (those in force at start-up included).",
        )
        .expect("valid");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "retouch_webhook_deliveries_total",
                "Webhook deliveries finished by this worker's relay, by outcome: delivered, gave_up (dead-lettered after retry_for), refused (host not allowed).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let webhook_duration = histogram(
            "retouch_webhook_delivery_duration_seconds",
            "From a result's publication to its webhook delivery's end (retries included).",
            DURATION_BUCKETS,
        );
        let build_info = IntGaugeVec::new(
            Opts::new("retouch_build_info", "Build and runtime facts; always 1."),
            &["version", "model", "device"],
        )
        .expect("valid");

        for c in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(dead_letters.clone()),
            Box::new(job_duration.clone()),
            Box::new(stage_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(step_duration.clone()),
            Box::new(jobs_in_flight.clone()),
            Box::new(model_load_seconds.clone()),
            Box::new(model_ready.clone()),
            Box::new(input_bytes.clone()),
            Box::new(output_bytes.clone()),
            Box::new(nsfw_flagged.clone()),
            Box::new(last_success.clone()),
            Box::new(gpu_memory_used.clone()),
            Box::new(broker_connected.clone()),
            Box::new(reconnects.clone()),
            Box::new(lost_acks.clone()),
            Box::new(unroutable_results.clone()),
            Box::new(events.clone()),
            Box::new(cancel_requests.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(webhook_duration.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for outcome in Outcome::ALL {
            if outcome.has_error() {
                for kind in ErrorKind::ALL {
                    jobs.with_label_values(&[outcome.as_str(), kind.as_str()]);
                }
            } else {
                jobs.with_label_values(&[outcome.as_str(), "none"]);
            }
        }
        for kind in ErrorKind::ALL {
            dead_letters.with_label_values(&[kind.as_str()]);
        }
        for stage in Stage::ALL {
            stage_duration.with_label_values(&[stage.as_str()]);
        }
        for outcome in ["published", "failed", "dropped"] {
            events.with_label_values(&[outcome]);
        }
        for outcome in ["delivered", "gave_up", "refused"] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        Self {
            registry,
            jobs,
            dead_letters,
            job_duration,
            stage_duration,
            batch_size,
            step_duration,
            jobs_in_flight,
            model_load_seconds,
            model_ready,
            input_bytes,
            output_bytes,
            nsfw_flagged,
            last_success,
            gpu_memory_used,
            broker_connected,
            reconnects,
            lost_acks,
            unroutable_results,
            events,
            cancel_requests,
            webhook_deliveries,
            webhook_duration,
            build_info,
            queue,
        }
    }

    /// Records a progress event handed to the broker (`true`) or refused by it.
    pub fn event(&self, published: bool) {
        self.events.with_label_values(&[if published { "published" } else { "failed" }]).inc();
    }

    /// Records a progress event dropped because the buffer was full.
    pub fn event_dropped(&self) {
        self.events.with_label_values(&["dropped"]).inc();
    }

    /// Records a cancel request read from the stream.
    pub fn cancel_request(&self) {
        self.cancel_requests.inc();
    }

    /// Records a finished webhook delivery: `outcome` is `delivered`, `gave_up` or `refused`,
    /// `seconds` from the result's publication.
    pub fn webhook(&self, outcome: &str, seconds: f64) {
        self.webhook_deliveries.with_label_values(&[outcome]).inc();
        self.webhook_duration.observe(seconds);
    }

    /// Records a settled delivery.
    pub fn settled(&self, outcome: Outcome, error: Option<ErrorKind>, seconds: f64) {
        let kind = match (outcome.has_error(), error) {
            (true, Some(k)) => k.as_str(),
            (true, None) => ErrorKind::Internal.as_str(),
            (false, _) => "none",
        };
        self.jobs.with_label_values(&[outcome.as_str(), kind]).inc();
        if outcome == Outcome::Failed {
            self.dead_letters.with_label_values(&[kind]).inc();
        }
        if matches!(outcome, Outcome::Succeeded | Outcome::Duplicate) {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            self.last_success.set(now);
        }
        if outcome != Outcome::Released {
            self.job_duration.observe(seconds);
        }
    }

    /// Records a stage's duration for one job.
    pub fn stage(&self, stage: Stage, seconds: f64) {
        self.stage_duration.with_label_values(&[stage.as_str()]).observe(seconds);
    }

    /// Records a model call's batch size.
    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    /// Records one denoising step.
    pub fn step(&self, seconds: f64) {
        self.step_duration.observe(seconds);
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &IntGauge {
        &self.jobs_in_flight
    }

    /// Input bytes downloaded.
    pub fn input_bytes(&self, n: usize) {
        self.input_bytes.inc_by(n as u64);
    }

    /// Output bytes uploaded.
    pub fn output_bytes(&self, n: usize) {
        self.output_bytes.inc_by(n as u64);
    }

    /// One image flagged by the safety checker.
    pub fn nsfw_flagged(&self) {
        self.nsfw_flagged.inc();
    }

    /// Marks the model loaded (or not) and records the load time.
    pub fn model_loaded(&self, seconds: f64, version: &str, model: &str, device: &str) {
        self.model_load_seconds.set(seconds);
        self.model_ready.set(1);
        self.build_info.with_label_values(&[version, model, device]).set(1);
    }

    /// How many deliveries have been settled, per outcome, since the metrics were created.
    pub fn summary(&self) -> Summary {
        let count = |outcome: Outcome| -> u64 {
            if outcome.has_error() {
                ErrorKind::ALL.iter().map(|k| self.jobs.with_label_values(&[outcome.as_str(), k.as_str()]).get()).sum()
            } else {
                self.jobs.with_label_values(&[outcome.as_str(), "none"]).get()
            }
        };
        Summary {
            succeeded: count(Outcome::Succeeded),
            duplicate: count(Outcome::Duplicate),
            retried: count(Outcome::Retried),
            failed: count(Outcome::Failed),
            released: count(Outcome::Released),
            cancelled: count(Outcome::Cancelled),
        }
    }

    /// Sets the GPU memory gauge.
    pub fn gpu_memory(&self, bytes: u64) {
        self.gpu_memory_used.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        // Broker state lives in atomics owned by the source; copy it in at scrape time.
        let q = &self.queue;
        self.broker_connected.set(i64::from(q.connected.load(Ordering::Relaxed)));
        sync_counter(&self.reconnects, q.reconnects.load(Ordering::Relaxed));
        sync_counter(&self.lost_acks, q.lost_acks.load(Ordering::Relaxed));
        sync_counter(&self.unroutable_results, q.unroutable_results.load(Ordering::Relaxed));
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Raises a counter to `value` (the atomics only grow).
fn sync_counter(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_combination_is_exported_from_the_start() {
        let m = Metrics::new(Arc::new(QueueCounters::default()));
        let text = m.render();
        assert!(text.contains(r#"retouch_jobs_total{error_kind="image_too_large",outcome="failed"} 0"#), "{text}");
        assert!(text.contains(r#"retouch_stage_duration_seconds_bucket{stage="upload",le="600"} 0"#), "{text}");
        assert!(text.contains("retouch_amqp_lost_acks_total 0"));
        assert!(text.contains(r#"retouch_jobs_total{error_kind="nsfw",outcome="failed"} 0"#), "{text}");
        m.nsfw_flagged();
        assert!(m.render().contains("retouch_nsfw_flagged_total 1"));
    }

    #[test]
    fn broker_counters_are_copied_at_scrape_time() {
        let q = Arc::new(QueueCounters::default());
        let m = Metrics::new(q.clone());
        q.reconnects.fetch_add(2, Ordering::Relaxed);
        q.connected.store(true, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("retouch_amqp_reconnects_total 2"), "{text}");
        assert!(text.contains("retouch_broker_connected 1"), "{text}");
        m.settled(Outcome::Failed, Some(ErrorKind::InvalidJob), 0.5);
        assert!(m.render().contains(r#"retouch_dead_letters_total{error_kind="invalid_job"} 1"#));
    }
}
