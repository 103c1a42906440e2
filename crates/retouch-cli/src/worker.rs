//! `retouch worker` and `retouch fetch-model`: wiring the real implementations — RabbitMQ
//! (retouch-amqp), S3 (retouch-s3), the candle model (retouch-model) — into the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use retouch_amqp::{AmqpPublisher, AmqpSettings, AmqpSource};
use retouch_core::editor::Editor;
use retouch_core::imaging::DecodeLimits;
use retouch_core::job::ObjectUrl;
use retouch_core::queue::QueueCounters;
use retouch_core::safety::SafetyPolicy;
use retouch_model::{InstructPix2Pix, LoadOptions, ModelSource};
use retouch_s3::{S3Settings, S3Store};
use retouch_worker::backend::Backend;
use retouch_worker::batcher::BatchPolicy;
use retouch_worker::config::WorkerConfig;
use retouch_worker::engine::{self, EngineSettings};
use retouch_worker::http::{self, HttpState};
use retouch_worker::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::cli_error::bad_input;

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
    /// Checkpoint: a directory, hf:OWNER/NAME[@REVISION] or s3://bucket/prefix/ [default: the config's `model`].
    #[arg(long)]
    pub model: Option<String>,
    /// Weight variant, e.g. fp16 [default: the config's `model_variant`].
    #[arg(long)]
    pub variant: Option<String>,
    /// Cache for s3:// models [default: the config's `model_cache_dir`].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// TOML config file for the S3 settings (RETOUCH_* variables apply too).
    #[arg(long, env = "RETOUCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Safety checker policy deciding whether its files are fetched (auto: when the checkpoint
    /// ships one; on/block: too; off: never) [default: the config's `safety_checker`].
    #[arg(long, value_name = "auto|on|off|block")]
    pub safety_checker: Option<SafetyPolicy>,
}

/// The worker configuration: `path` (if any), then `RETOUCH_*` variables; errors are bad input.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<WorkerConfig> {
    WorkerConfig::load(path, std::env::vars()).map_err(|e| bad_input(format!("configuration: {e}")))
}

/// S3 settings from the worker config.
pub fn s3_settings(config: &WorkerConfig) -> S3Settings {
    S3Settings {
        endpoint: (!config.s3_endpoint.is_empty()).then(|| config.s3_endpoint.clone()),
        region: config.s3_region.clone(),
        force_path_style: config.effective_path_style(),
        connect_timeout: config.s3_connect_timeout,
        operation_timeout: config.s3_operation_timeout,
        attempt_timeout: config.s3_operation_timeout,
        max_attempts: config.s3_max_attempts,
    }
}

/// Broker settings from the worker config; `name` labels the connection.
pub fn amqp_settings(config: &WorkerConfig, name: &str) -> AmqpSettings {
    AmqpSettings {
        url: config.amqp_url.clone(),
        jobs_exchange: config.jobs_exchange.clone(),
        jobs_queue: config.jobs_queue.clone(),
        results_exchange: config.results_exchange.clone(),
        dead_letter_exchange: config.dead_letter_exchange.clone(),
        dead_letter_queue: config.dead_letter_queue.clone(),
        declare_topology: config.declare_topology,
        delivery_limit: config.delivery_limit,
        prefetch: config.effective_prefetch(),
        connection_name: format!("retouch {name}"),
        ..AmqpSettings::default()
    }
}

/// A local directory holding the checkpoint: syncs `s3://` prefixes into `cache_dir`,
/// downloads Hub models into the Hugging Face cache (the safety checker's files only when
/// `safety` runs it). Blocking (Hub downloads).
///
/// # Errors
/// Bad input for unusable sources; fetch failures otherwise.
fn resolve_model(
    model: &str,
    variant: Option<&str>,
    safety: SafetyPolicy,
    cache_dir: &Path,
    s3: Option<&S3Store>,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<PathBuf> {
    if model.starts_with("s3://") {
        let s3 = s3.context("an s3:// model needs S3 settings")?;
        let prefix = if model.ends_with('/') { model.to_string() } else { format!("{model}/") };
        let dir = runtime
            .block_on(s3.sync_prefix(&prefix, cache_dir))
            .with_context(|| format!("cannot sync the model from {prefix} into {}", cache_dir.display()))?;
        return Ok(dir);
    }
    let source: ModelSource = model.parse().map_err(|e: retouch_model::ModelError| bad_input(e.to_string()))?;
    source.resolve(variant, safety).with_context(|| format!("cannot fetch model {source}"))
}

/// Runs `retouch fetch-model`: brings the model into its cache and prints the directory.
///
/// # Errors
/// Configuration, S3 or Hub failures.
pub async fn fetch_model(args: FetchModelArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref())?;
    let model = args.model.unwrap_or(config.model.clone());
    let variant = args.variant.or_else(|| (!config.model_variant.is_empty()).then(|| config.model_variant.clone()));
    let cache_dir = args.cache_dir.unwrap_or(config.model_cache_dir.clone());
    let safety = args.safety_checker.unwrap_or(config.safety_checker);
    let s3 = if model.starts_with("s3://") { Some(S3Store::new(s3_settings(&config)).await?) } else { None };
    let handle = tokio::runtime::Handle::current();
    let dir = tokio::task::spawn_blocking(move || {
        resolve_model(&model, variant.as_deref(), safety, &cache_dir, s3.as_ref(), &handle)
    })
    .await
    .context("the fetch task failed")??;
    println!("{}", dir.display());
    Ok(())
}

fn host_name() -> String {
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
    let worker_name = if config.worker_name.is_empty() { host_name() } else { config.worker_name.clone() };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), worker = %worker_name, "effective configuration:\n{}", config.redacted());

    let counters = Arc::new(QueueCounters::default());
    let metrics = Arc::new(Metrics::new(counters.clone()));
    let stop = CancellationToken::new();

    // Storage first: wrong credentials or a missing bucket should stop the worker before it
    // takes any job.
    let s3 = S3Store::new(s3_settings(&config)).await.context("cannot set up S3")?;
    let output_bucket = ObjectUrl::parse(&format!("{}/x", config.output_prefix.trim_end_matches('/')))
        .map_err(|e| bad_input(format!("output_prefix: {e}")))?
        .bucket;
    if !output_bucket.is_empty() {
        s3.check_bucket(&output_bucket)
            .await
            .with_context(|| format!("cannot use the output bucket {output_bucket:?}"))?;
    }

    // The model thread fetches and loads the model; /readyz says "model loading" meanwhile.
    let backend = {
        let (config, s3, handle) = (config.clone(), s3.clone(), tokio::runtime::Handle::current());
        Arc::new(Backend::spawn(
            move || {
                let variant = (!config.model_variant.is_empty()).then_some(config.model_variant.as_str());
                let load = || -> anyhow::Result<InstructPix2Pix> {
                    let dir = resolve_model(
                        &config.model,
                        variant,
                        config.safety_checker,
                        &config.model_cache_dir,
                        Some(&s3),
                        &handle,
                    )?;
                    let device =
                        config.device.parse().map_err(|e: retouch_model::ModelError| bad_input(e.to_string()))?;
                    let options = LoadOptions {
                        device,
                        variant: variant.map(str::to_string),
                        safety_checker: config.safety_checker,
                        ..LoadOptions::default()
                    };
                    Ok(InstructPix2Pix::load(&dir, &config.model, &options)?)
                };
                load().map(|m| Box::new(m) as Box<dyn Editor>).map_err(|e| format!("{e:#}"))
            },
            metrics.clone(),
            env!("CARGO_PKG_VERSION"),
        ))
    };

    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on metrics_addr {}", config.metrics_addr))?;
    let http_state = HttpState { metrics: metrics.clone(), model: backend.watch(), queue: counters.clone() };
    let http_task = {
        let stop = stop.clone();
        tokio::spawn(async move { http::serve(listener, http_state, async move { stop.cancelled().await }).await })
    };
    tracing::info!(addr = %config.metrics_addr, "serving /metrics, /healthz, /readyz");

    let model = tokio::select! {
        ready = backend.ready() => ready.map_err(|e| anyhow::anyhow!("the model did not load: {e}"))?,
        () = crate::signals::terminated() => {
            stop.cancel();
            return Ok(());
        }
    };
    #[cfg(feature = "cuda")]
    spawn_gpu_memory_gauge(metrics.clone(), &config.device, stop.clone());
    tracing::info!(model = %model.name, device = %model.device, dtype = %model.dtype, "model ready");

    // The broker last: jobs are taken only once the model can run them.
    let settings = amqp_settings(&config, &worker_name);
    let source = AmqpSource::connect(settings.clone(), counters.clone()).await.context("cannot consume jobs")?;
    let publisher =
        Arc::new(AmqpPublisher::connect(settings, counters.clone()).await.context("cannot publish results")?);

    let engine_settings = EngineSettings {
        output_prefix: config.output_prefix.clone(),
        concurrency: usize::from(config.effective_prefetch()),
        batch: BatchPolicy { max_batch: config.max_batch, max_wait: config.max_batch_wait },
        job_timeout: config.job_timeout,
        shutdown_timeout: config.shutdown_timeout,
        limits: DecodeLimits { max_pixels: config.max_input_pixels, max_bytes: config.max_input_bytes },
        retry_backoff: config.retry_backoff,
        retry_backoff_max: config.retry_backoff_max,
        worker_name,
        block_nsfw: config.safety_checker.blocks(),
    };
    let summary = engine::run(
        engine_settings,
        source,
        Arc::new(s3),
        publisher.clone(),
        backend,
        metrics,
        crate::signals::terminated(),
    )
    .await?;
    tracing::info!(?summary, "stopped");
    if let Ok(publisher) = Arc::try_unwrap(publisher) {
        publisher.shutdown().await;
    }
    stop.cancel();
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

#[cfg(test)]
mod tests {
    use retouch_amqp::AmqpSettings;
    use retouch_worker::config::WorkerConfig;

    use super::amqp_settings;

    /// The worker's configuration and the AMQP crate each carry the protocol's default names;
    /// a worker with no configuration must describe the same topology as the library.
    #[test]
    fn default_config_gives_the_default_topology() {
        let from_config = amqp_settings(&WorkerConfig::default(), "test");
        let library = AmqpSettings::default();
        assert_eq!(
            (
                &from_config.url,
                &from_config.jobs_exchange,
                &from_config.jobs_routing_key,
                &from_config.jobs_queue,
                &from_config.results_exchange,
                &from_config.dead_letter_exchange,
                &from_config.dead_letter_queue,
                from_config.delivery_limit,
                from_config.declare_topology,
            ),
            (
                &library.url,
                &library.jobs_exchange,
                &library.jobs_routing_key,
                &library.jobs_queue,
                &library.results_exchange,
                &library.dead_letter_exchange,
                &library.dead_letter_queue,
                library.delivery_limit,
                library.declare_topology,
            )
        );
    }
}
