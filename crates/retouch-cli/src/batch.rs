//! `retouch batch`: a whole folder (or manifest) on one machine, no infrastructure.
//!
//! The same engine as `retouch worker` — batching, pipelining, retries, failure handling,
//! results — with an in-process queue in place of RabbitMQ, the filesystem in place of S3 and
//! a JSON-lines report in place of the results exchange. Bad files are reported and skipped;
//! an interrupted run (Ctrl-C) gives back what it had not started, and running the same
//! command again skips every image already done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use retouch_core::editor::Editor;
use retouch_core::imaging::DecodeLimits;
use retouch_core::job::{EditJob, JobResult, Status};
use retouch_core::params::{EditParams, OutputFormat};
use retouch_core::queue::QueueCounters;
use retouch_worker::backend::Backend;
use retouch_worker::engine::{self, EngineSettings};
use retouch_worker::local::{FsStore, JsonlReport, LocalQueue};
use retouch_worker::metrics::Metrics;

use crate::cli_error::bad_input;
use crate::manifest;
use crate::model::ModelArgs;
use crate::params::ParamArgs;

/// Flags of `retouch batch`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("inputs").required(true).args(["input_dir", "manifest"])))]
pub struct BatchArgs {
    /// Edit every image in this folder (not recursive).
    #[arg(long)]
    pub input_dir: Option<PathBuf>,
    /// Or: a .jsonl/.csv manifest with the protocol's fields (paths relative to the manifest).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The instruction for every image (a manifest row may carry its own).
    #[arg(long)]
    pub instruction: Option<String>,
    /// Where outputs (and the report) go.
    #[arg(long)]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub params: ParamArgs,
    /// Output format: png, jpeg or webp.
    #[arg(long, default_value = "png")]
    pub format: OutputFormat,
    /// JPEG quality.
    #[arg(long, default_value_t = retouch_core::params::DEFAULT_QUALITY)]
    pub quality: u8,
    /// Images per model call (same size, steps and scheduler).
    #[arg(long, default_value_t = 4)]
    pub max_batch: usize,
    /// Attempts after the first for transient failures.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// The report (one JSON result per line; appended). Default: <output-dir>/report.jsonl.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn file_url(path: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(format!("file://{}", abs.display()))
}

/// Jobs for every image of a folder: output `<output-dir>/<stem>.<ext>`.
fn folder_jobs(dir: &Path, output_dir: &Path, args: &BatchArgs, params: &EditParams) -> anyhow::Result<Vec<EditJob>> {
    let instruction = args.instruction.as_deref().ok_or_else(|| bad_input("--input-dir needs --instruction"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad_input(format!("--input-dir {}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    manifest::IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                })
        })
        .collect();
    files.sort();
    let ext = params.format.unwrap_or(OutputFormat::Png).extension();
    let mut outputs: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut jobs = Vec::with_capacity(files.len());
    for file in files {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let output = output_dir.join(format!("{stem}.{ext}"));
        if let Some(other) = outputs.insert(output.clone(), file.clone()) {
            return Err(bad_input(format!(
                "{} and {} would both write {}; rename one or use --manifest with explicit outputs",
                other.display(),
                file.display(),
                output.display()
            )));
        }
        let source = file_url(&file)?;
        jobs.push(EditJob {
            job_id: manifest::derived_job_id("local", &source, instruction, params),
            source,
            instruction: instruction.to_string(),
            output: Some(file_url(&output)?),
            campaign_id: None,
            params: params.clone(),
            metadata: None,
            priority: None,
            events: None,
            webhook: None,
        });
    }
    Ok(jobs)
}

/// Jobs from a manifest: relative sources resolve against the manifest's folder, relative
/// outputs against `--output-dir`.
fn manifest_jobs(
    path: &Path,
    output_dir: &Path,
    args: &BatchArgs,
    params: &EditParams,
) -> anyhow::Result<Vec<EditJob>> {
    let base = path.parent().unwrap_or(Path::new("."));
    manifest::read(path)?
        .into_iter()
        .map(|mut row| {
            if !row.source.contains("://") {
                row.source = file_url(&base.join(&row.source))?;
            }
            if let Some(out) = &row.output
                && !out.contains("://")
            {
                row.output = Some(file_url(&output_dir.join(out))?);
            }
            manifest::to_job(row, Some("local"), args.instruction.as_deref(), params)
        })
        .collect()
}

/// Runs `retouch batch`.
///
/// # Errors
/// Bad input for unusable arguments; model errors; "some jobs failed" when any did.
pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    let output_dir = args.output_dir.clone();
    std::fs::create_dir_all(&output_dir)
        .map_err(|e| bad_input(format!("--output-dir {}: {e}", output_dir.display())))?;
    let mut params = args.params.to_params();
    params.format = Some(args.format);
    params.quality = Some(args.quality);
    params.resolve(|| 0).map_err(|e| bad_input(format!("--{}: {}", e.field.replace('_', "-"), e.message)))?;
    let jobs = match (&args.input_dir, &args.manifest) {
        (Some(dir), _) => folder_jobs(dir, &output_dir, &args, &params)?,
        (None, Some(path)) => manifest_jobs(path, &output_dir, &args, &params)?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    if jobs.is_empty() {
        return Err(bad_input("no images to edit"));
    }
    let total = jobs.len();
    let bodies = jobs
        .into_iter()
        .map(|j| Ok((j.job_id.clone(), serde_json::to_vec(&j)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let metrics = Arc::new(Metrics::new(Arc::new(QueueCounters::default())));
    let model = args.model.settings()?;
    let block_nsfw = model.safety_checker.blocks();
    let backend = Arc::new(Backend::spawn(
        move || {
            crate::model::load_blocking(&model).map(|m| Box::new(m) as Box<dyn Editor>).map_err(|e| format!("{e:#}"))
        },
        metrics.clone(),
        env!("CARGO_PKG_VERSION"),
    ));

    let bar =
        crate::progress::bar(total as u64, "{spinner} [{bar:30}] {pos}/{len} images {msg} ({per_sec}, eta {eta})");
    bar.set_message("loading model…");
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let report_path = args.report.clone().unwrap_or_else(|| output_dir.join("report.jsonl"));
    let report = {
        let (bar, counts) = (bar.clone(), counts.clone());
        JsonlReport::append(&report_path, move |r: &JobResult| {
            let slot = match (r.status, r.duplicate) {
                (Status::Succeeded, false) => 0,
                (Status::Succeeded, true) => 1,
                // `retouch batch` has no cancel requests: counted with the failures if one came.
                (Status::Failed | Status::Cancelled, _) => 2,
            };
            counts[slot].fetch_add(1, Ordering::Relaxed);
            if let Some(e) = &r.error {
                bar.println(format!(
                    "failed: {} ({}): {}",
                    r.source.as_deref().unwrap_or(&r.job_id),
                    e.kind,
                    e.message
                ));
            }
            bar.inc(1);
            bar.set_message(format!(
                "{} edited, {} already done, {} failed",
                counts[0].load(Ordering::Relaxed),
                counts[1].load(Ordering::Relaxed),
                counts[2].load(Ordering::Relaxed)
            ));
        })
        .with_context(|| format!("cannot open the report {}", report_path.display()))?
    };

    let settings = EngineSettings {
        output_prefix: file_url(&output_dir)?,
        max_batch: args.max_batch.max(1),
        max_input_bytes: DecodeLimits::default().max_bytes,
        max_input_pixels: DecodeLimits::default().max_pixels,
        job_timeout: Duration::from_secs(24 * 3600),
        shutdown_timeout: Duration::from_secs(30),
        retry_backoff: Duration::from_millis(500),
        retry_backoff_max: Duration::from_secs(10),
        worker_name: "local".into(),
        block_nsfw,
        ..EngineSettings::default()
    };
    let queue = LocalQueue::new(bodies, args.retries);
    let started = Instant::now();
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let interrupted = interrupted.clone();
        async move {
            crate::signals::terminated().await;
            interrupted.store(true, Ordering::Relaxed);
        }
    };
    let ready = backend.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    bar.set_message(format!("model {} on {}", ready.name, ready.device));
    let summary = engine::run(
        settings,
        queue.clone(),
        Arc::new(FsStore),
        Arc::new(report),
        backend,
        metrics,
        engine::Control::default(),
        shutdown,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    bar.finish_and_clear();

    let done = summary.succeeded;
    let skipped = summary.duplicate;
    let failed = summary.failed;
    let released = queue.released().len();
    println!(
        "{total} images: {done} edited, {skipped} already done, {failed} failed{} in {:.1} s — report: {}",
        if released > 0 { format!(", {released} not started (run again to resume)") } else { String::new() },
        started.elapsed().as_secs_f64(),
        report_path.display()
    );
    if interrupted.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted; run the same command again to resume");
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {total} images failed; see the report");
    }
    Ok(())
}
