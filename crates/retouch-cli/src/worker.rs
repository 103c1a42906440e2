//! `retouch worker` and `retouch fetch-model`: wiring the real implementations — RabbitMQ
//! (retouch-amqp), S3 (retouch-s3), the candle model (retouch-model) — into the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use retouch_amqp::{AmqpPublisher, AmqpSource, CancelFeed, WebhookQueue};
use retouch_core::editor::Editor;
use retouch_core::job::ObjectUrl;
use retouch_core::queue::QueueCounters;
use retouch_s3::S3Store;
use retouch_webhooks::WebhookClient;
use retouch_worker::backend::Backend;
use retouch_worker::cancel::CancelRegistry;
use retouch_worker::engine::{self, Control, EngineSettings, WebhookPolicy};
use retouch_worker::http::{self, HttpState};
use retouch_worker::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::cli_error::bad_input;
use crate::config::WorkerConfig;
use crate::model::ModelArgs;

/// Flags of `retouch worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// TOML config file (see config/worker.toml); without it, defaults + RETOUCH_* variables.
    #[arg(long, env = "RETOUCH_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Flags of `retouch fetch-model`.
#[derive(clap::Args, Debug)]
pub struct FetchModelArgs {
    /// TOML config file: its [model] section is the default of the model flags, its [s3]
    /// section reaches s3:// models (RETOUCH_* variables apply too).
    #[arg(long, env = "RETOUCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The model flags; each defaults to the config's [model] value. The safety checker's
    /// files are fetched only when --safety-checker runs it (auto: when the checkpoint ships
    /// one; on/block: too; off: never).
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The worker configuration: `path` (if any), then `RETOUCH_*` variables; deprecation
/// warnings are logged; errors are bad input (exit 2).
pub fn load_config(path: Option<&Path>) -> anyhow::Result<WorkerConfig> {
    let loaded = WorkerConfig::load(path, std::env::vars()).map_err(|e| bad_input(format!("configuration: {e}")))?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    Ok(loaded.config)
}

/// Runs `retouch fetch-model`: brings the model into its cache and prints the directory.
///
/// # Errors
/// Configuration, S3 or Hub failures.
pub async fn fetch_model(args: FetchModelArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref())?;
    let model = args.model.over(&config.model)?;
    let handle = tokio::runtime::Handle::current();
    let dir = tokio::task::spawn_blocking(move || model.fetch(&config.s3, &handle))
        .await
        .context("the fetch task failed")??;
    println!("{}", dir.display());
    Ok(())
}

/// This machine's name (the pod name in Kubernetes).
pub(crate) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "retouch-worker".into())
}

/// Runs `retouch worker` until SIGTERM/SIGINT.
///
/// # Errors
/// Configuration errors (exit 2), unreachable broker or storage at start-up, a model that does
/// not load.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref())?;
    let worker_name =
        if config.engine.worker_name.is_empty() { host_name() } else { config.engine.worker_name.clone() };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), worker = %worker_name, "effective configuration:\n{}", config.redacted());

    let counters = Arc::new(QueueCounters::default());
    let metrics = Arc::new(Metrics::new(counters.clone()));
    let stop = CancellationToken::new();
    // One SIGTERM/SIGINT listener for the worker's whole life, registered now: a signal that
    // arrives between two stages (after the model is ready, before the engine listens) is kept.
    let terminate = CancellationToken::new();
    tokio::spawn({
        let (terminate, signal) = (terminate.clone(), crate::signals::terminated());
        async move {
            signal.await;
            terminate.cancel();
        }
    });

    // Storage first: wrong credentials or a missing bucket should stop the worker before it
    // takes any job.
    let s3 = S3Store::new(config.s3.clone()).await.context("cannot set up S3")?;
    let output_bucket = ObjectUrl::parse(&format!("{}/x", config.engine.output_prefix.trim_end_matches('/')))
        .map_err(|e| bad_input(format!("engine.output_prefix: {e}")))?
        .bucket;
    if !output_bucket.is_empty() {
        s3.check_bucket(&output_bucket)
            .await
            .with_context(|| format!("cannot use the output bucket {output_bucket:?}"))?;
    }

    // The model thread fetches and loads the model; /readyz says "model loading" meanwhile.
    let backend = {
        let (model, s3, handle) = (config.model.clone(), config.s3.clone(), tokio::runtime::Handle::current());
        Arc::new(Backend::spawn(
            move || model.load(&s3, &handle).map(|m| Box::new(m) as Box<dyn Editor>).map_err(|e| format!("{e:#}")),
            metrics.clone(),
            env!("CARGO_PKG_VERSION"),
        ))
    };

    let addr = config.metrics.addr;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on metrics.addr {addr}"))?;
    let http_state = HttpState {
        metrics: metrics.clone(),
        model: backend.watch(),
        queue: counters.clone(),
        unhealthy_hold: http::UNHEALTHY_HOLD,
    };
    let http_task = {
        let stop = stop.clone();
        tokio::spawn(async move { http::serve(listener, http_state, async move { stop.cancelled().await }).await })
    };
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let model = tokio::select! {
        ready = backend.ready() => ready.map_err(|e| anyhow::anyhow!("the model did not load: {e}"))?,
        () = terminate.cancelled() => {
            stop.cancel();
            return Ok(());
        }
    };
    #[cfg(feature = "cuda")]
    spawn_gpu_memory_gauge(metrics.clone(), &config.model.device, stop.clone());
    tracing::info!(model = %model.name, device = %model.device, dtype = %model.dtype, "model ready");

    // The broker last: jobs are taken only once the model can run them, and only once every
    // cancel request in force is known.
    let settings = config.amqp_for(&worker_name);
    let cancels = Arc::new(CancelRegistry::new(settings.cancel_retention));
    let (mut feed, in_force) = CancelFeed::open(settings.clone()).await.context("cannot read the cancel stream")?;
    for c in &in_force {
        cancels.record(&c.request, c.published_at);
        metrics.cancel_request();
    }
    tracing::info!(requests = in_force.len(), "cancel requests in force");
    let feed_task = {
        let (cancels, metrics, stop) = (cancels.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => return,
                    next = feed.next() => next,
                };
                match next {
                    Ok(c) => {
                        tracing::info!(jobs = c.request.job_ids.len(), campaign = ?c.request.campaign_id,
                            by = ?c.request.requested_by, "cancel request");
                        cancels.record(&c.request, c.published_at);
                        metrics.cancel_request();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the cancel stream failed; cancels no longer reach this worker");
                        return;
                    }
                }
            }
        })
    };
    let relay_task = if config.webhooks.enabled() {
        let client = Arc::new(WebhookClient::new(&config.webhooks).context("cannot set up the webhook client")?);
        let prefetch = u16::try_from(config.webhooks.concurrency).unwrap_or(u16::MAX);
        let queue = WebhookQueue::connect(settings.clone(), prefetch).await.context("cannot consume webhooks")?;
        let (webhooks, metrics, stop) = (config.webhooks.clone(), metrics.clone(), stop.clone());
        Some(tokio::spawn(crate::relay::run(queue, webhooks, client, metrics, stop)))
    } else {
        None
    };
    let source = AmqpSource::connect(settings.clone(), counters.clone()).await.context("cannot consume jobs")?;
    let publisher =
        Arc::new(AmqpPublisher::connect(settings, counters.clone()).await.context("cannot publish results")?);
    let control = Control {
        cancels,
        webhooks: WebhookPolicy {
            enabled: config.webhooks.enabled(),
            allow: config.webhooks.allow_list(),
            allow_http: config.webhooks.allow_http,
        },
    };

    let engine_settings = EngineSettings {
        concurrency: usize::from(config.effective_prefetch()),
        block_nsfw: config.model.safety_checker.blocks(),
        worker_name,
        ..config.engine.clone()
    };
    let summary = engine::run(
        engine_settings,
        source,
        Arc::new(s3),
        publisher.clone(),
        backend,
        metrics,
        control,
        terminate.clone().cancelled_owned(),
    )
    .await?;
    tracing::info!(?summary, "stopped");
    if let Ok(publisher) = Arc::try_unwrap(publisher) {
        publisher.shutdown().await;
    }
    stop.cancel();
    let _ = feed_task.await;
    if let Some(relay) = relay_task {
        let _ = relay.await;
    }
    let _ = http_task.await;
    Ok(())
}

/// Samples the device's memory use into `retouch_gpu_memory_used_bytes` every 5 s.
#[cfg(feature = "cuda")]
fn spawn_gpu_memory_gauge(metrics: Arc<Metrics>, device: &str, stop: CancellationToken) {
    let Ok(retouch_model::DeviceSpec::Cuda(ordinal)) = device.parse() else { return };
    tokio::spawn(async move {
        loop {
            if let Some(used) = retouch_model::device::gpu_memory_used(ordinal) {
                metrics.gpu_memory(used);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
        }
    });
}
