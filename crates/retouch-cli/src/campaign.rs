//! `retouch submit` and `retouch watch`: start a campaign with one command, follow it to a
//! report.
//!
//! `submit` turns a manifest (JSONL/CSV) or an S3 prefix into protocol jobs with deterministic
//! ids, declares the campaign's own results queue (so no result is missed before anyone
//! watches), publishes with confirms and `mandatory` in pipelined chunks, and records each
//! confirmed chunk in the campaign ledger; jobs already in the ledger are skipped, so running
//! the same submit twice — or resuming an interrupted one — adds nothing.
//!
//! `watch` consumes the campaign's results queue, appends every result to a local state file
//! before acknowledging it (so it can be stopped and restarted without losing any), counts
//! each job once (at-least-once delivery repeats results; a re-driven failure that later
//! succeeds counts as succeeded), shows progress and ETA, and writes the report (JSONL or CSV)
//! when every submitted job has a result.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WorkerConfig;
use crate::progress::bar;
use anyhow::Context;
use retouch_amqp::{Admin, AmqpPublisher, JobPublishOptions, OutgoingJob};
use retouch_core::events::{EventType, JobEvent};
use retouch_core::job::{EditJob, EventKind, JobResult, ObjectUrl, Priority, Status, WebhookTarget};
use retouch_core::params::OutputFormat;
use retouch_core::queue::QueueCounters;
use retouch_s3::S3Store;

use crate::cli_error::bad_input;
use crate::ledger::{Entry, Ledger};
use crate::manifest;
use crate::params::ParamArgs;
use crate::storage::Storage;

/// Jobs per confirmed chunk (and ledger part).
const CHUNK: usize = 5_000;

/// Results `watch` holds unacknowledged at once (`basic.qos`): each is appended to the state
/// file before its ack, so a few hundred in flight keep the broker streaming without much
/// to redeliver after a crash.
const WATCH_PREFETCH: u16 = 500;

/// Broker and storage flags shared by the campaign commands.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Worker-style config file for the broker, S3 and queue names (RETOUCH_* variables apply).
    #[arg(long, env = "RETOUCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Broker URL [default: the config's amqp.url].
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Where the campaign ledger lives (s3://bucket/prefix or file:///dir) [default: the
    /// prefix given with --output, else the config's engine.output_prefix].
    #[arg(long)]
    pub ledger: Option<String>,
}

impl Connection {
    /// The worker-style config with the command-line overrides.
    pub fn config(&self) -> anyhow::Result<WorkerConfig> {
        let mut config = crate::worker::load_config(self.config.as_deref())?;
        if let Some(url) = &self.amqp_url {
            config.amqp.url = url.clone();
        }
        Ok(config)
    }
}

/// The store for ledgers and prefix listings; S3 is set up only when one of `urls` needs it,
/// so a campaign with a `file://` ledger needs no S3 settings.
async fn storage(config: &WorkerConfig, urls: &[&str]) -> anyhow::Result<Storage> {
    let s3 = if urls.iter().any(|u| u.starts_with("s3://")) {
        Some(S3Store::new(config.s3.clone()).await.context("cannot set up S3")?)
    } else {
        None
    };
    Ok(Storage { s3 })
}

/// Flags of `retouch submit`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("jobs").required(true).args(["manifest", "source"])))]
pub struct SubmitArgs {
    /// The campaign id ([A-Za-z0-9_-]{1,64}); names its results queue and ledger.
    #[arg(long)]
    pub campaign: String,
    /// Jobs from a .jsonl/.csv manifest with the protocol's fields.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Or: every image under this prefix (s3://bucket/in/).
    #[arg(long, requires = "output")]
    pub source: Option<String>,
    /// With --source: the output prefix; each source key maps to the same relative key here,
    /// with the output format's extension.
    #[arg(long)]
    pub output: Option<String>,
    /// The instruction (a manifest row may carry its own).
    #[arg(long)]
    pub instruction: Option<String>,
    #[command(flatten)]
    pub params: ParamArgs,
    /// Output format: png, jpeg or webp [default: png].
    #[arg(long)]
    pub format: Option<OutputFormat>,
    /// JPEG quality.
    #[arg(long)]
    pub quality: Option<u8>,
    /// Scheduling class of every job: `high` jobs go to the high-priority queue, which
    /// workers drain before the normal one (interactive edits ahead of a bulk campaign).
    #[arg(long, value_parser = parse_priority, default_value = "normal")]
    pub priority: Priority,
    /// Ask for progress events (`started`, `progress`) for every job; `retouch watch` shows
    /// the running ones.
    #[arg(long)]
    pub progress: bool,
    /// POST every job's result to this URL, signed (its host must be on the workers'
    /// `webhooks.allow_hosts`).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Show what would be published and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub connection: Connection,
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    match s {
        "normal" => Ok(Priority::Normal),
        "high" => Ok(Priority::High),
        other => Err(format!("{other:?}: expected high or normal")),
    }
}

/// Jobs for every image under an S3 prefix.
async fn prefix_jobs(
    storage: &Storage,
    source: &str,
    output: &str,
    args: &SubmitArgs,
    params: &retouch_core::params::EditParams,
) -> anyhow::Result<Vec<EditJob>> {
    let instruction = args.instruction.as_deref().ok_or_else(|| bad_input("--source needs --instruction"))?;
    let s3 = storage.s3.as_ref().context("--source needs S3")?;
    let objects = s3.list_prefix(source).await.with_context(|| format!("cannot list {source}"))?;
    let source_prefix = ObjectUrl::parse(&format!("{}/x", source.trim_end_matches('/')))
        .map_err(|e| bad_input(format!("--source: {e}")))?;
    let strip = source_prefix.key.trim_end_matches('x');
    let ext = params.format.unwrap_or(OutputFormat::Png).extension();
    let mut jobs = Vec::new();
    for (url, _size) in objects {
        let relative = url.key.strip_prefix(strip).unwrap_or(&url.key);
        let Some((stem, source_ext)) = relative.rsplit_once('.') else { continue };
        if !manifest::IMAGE_EXTENSIONS.contains(&source_ext.to_ascii_lowercase().as_str()) {
            continue;
        }
        let source = url.to_string();
        jobs.push(EditJob {
            job_id: manifest::derived_job_id(&args.campaign, &source, instruction, params),
            output: Some(format!("{}/{stem}.{ext}", output.trim_end_matches('/'))),
            source,
            instruction: instruction.to_string(),
            campaign_id: Some(args.campaign.clone()),
            params: params.clone(),
            metadata: None,
            priority: None,
            events: None,
            webhook: None,
        });
    }
    Ok(jobs)
}

/// Runs `retouch submit`.
///
/// # Errors
/// Bad input for invalid jobs (nothing is published then); broker or storage failures.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let config = args.connection.config()?;
    let mut params = args.params.to_params();
    params.format = args.format;
    params.quality = args.quality;
    params.resolve(|| 0).map_err(|e| bad_input(format!("--{}: {}", e.field.replace('_', "-"), e.message)))?;
    let ledger_root = args
        .connection
        .ledger
        .clone()
        .or_else(|| args.output.clone())
        .unwrap_or_else(|| config.engine.output_prefix.clone());
    let storage = storage(&config, &[&ledger_root, args.source.as_deref().unwrap_or_default()]).await?;

    let jobs = match (&args.manifest, &args.source) {
        (Some(path), _) => manifest::read(path)?
            .into_iter()
            .map(|row| manifest::to_job(row, Some(&args.campaign), args.instruction.as_deref(), &params))
            .collect::<anyhow::Result<Vec<_>>>()?,
        (None, Some(source)) => {
            prefix_jobs(&storage, source, args.output.as_deref().unwrap_or_default(), &args, &params).await?
        }
        (None, None) => unreachable!("clap requires one"),
    };
    // Validate everything before publishing anything.
    let mut entries = Vec::with_capacity(jobs.len());
    let mut bodies = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        if args.priority == Priority::High {
            job.priority = Some(Priority::High);
        }
        if args.progress {
            job.events = Some(vec![EventKind::Progress]);
        }
        if let Some(url) = &args.webhook {
            job.webhook = Some(WebhookTarget { url: url.clone() });
        }
        if job.campaign_id.as_deref() != Some(args.campaign.as_str()) {
            return Err(bad_input(format!(
                "job {}: its campaign_id differs from --campaign {}",
                job.job_id, args.campaign
            )));
        }
        let valid = job
            .clone()
            .validate(&config.engine.output_prefix)
            .map_err(|e| bad_input(format!("job {}: {}", job.job_id, e.message)))?;
        entries.push(Entry {
            job_id: job.job_id.clone(),
            source: valid.source.to_string(),
            output: valid.output.to_string(),
        });
        bodies.push(serde_json::to_vec(&job)?);
    }
    let mut ledger = Ledger::open(&storage, &ledger_root, &args.campaign).await?;
    let already = ledger.published().into_iter().map(str::to_string).collect::<std::collections::BTreeSet<_>>();
    let mut seen = std::collections::BTreeSet::new();
    let fresh: Vec<(Entry, Vec<u8>)> = entries
        .into_iter()
        .zip(bodies)
        .filter(|(e, _)| !already.contains(&e.job_id) && seen.insert(e.job_id.clone()))
        .collect();
    let total_after = already.len() + fresh.len();

    if args.dry_run {
        for (entry, body) in fresh.iter().take(10) {
            println!("{} {}", entry.job_id, String::from_utf8_lossy(body));
        }
        if fresh.len() > 10 {
            println!("… and {} more", fresh.len() - 10);
        }
        println!(
            "dry run: {} new job(s) for campaign {} ({} already submitted); nothing was published",
            fresh.len(),
            args.campaign,
            already.len()
        );
        return Ok(());
    }

    let counters = Arc::new(QueueCounters::default());
    let settings = config.amqp_for("submit");
    let publisher = AmqpPublisher::connect(settings.clone(), counters).await.context("cannot connect to the broker")?;
    let admin = Admin::connect(settings).await.context("cannot connect to the broker")?;
    let queue = admin.declare_campaign_queue(&args.campaign).await?;
    admin.close().await;

    let progress = bar(fresh.len() as u64, "{spinner} publishing [{bar:30}] {pos}/{len} jobs ({per_sec}, eta {eta})");
    let publish_started = Instant::now();
    let mut published = 0usize;
    let mut rest = fresh;
    while !rest.is_empty() {
        let tail = rest.split_off(CHUNK.min(rest.len()));
        let chunk = std::mem::replace(&mut rest, tail);
        let outgoing = chunk.iter().map(|(e, body)| OutgoingJob {
            body: body.clone(),
            message_id: e.job_id.clone(),
            options: JobPublishOptions { priority: args.priority, ..JobPublishOptions::default() },
        });
        let confirmed = publisher.publish_jobs(outgoing).await.context("publishing jobs")?;
        anyhow::ensure!(confirmed as usize == chunk.len(), "only {confirmed} of {} jobs were confirmed", chunk.len());
        published += chunk.len();
        progress.set_position(published as u64);
        ledger.append(chunk.into_iter().map(|(e, _)| e).collect()).await?;
    }
    let publish_seconds = publish_started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    publisher.shutdown().await;
    println!(
        "campaign {}: published {published} new job(s) in {publish_seconds:.2} s ({:.0} jobs/s); {} were already submitted; \
         {total_after} in total; results collect in queue {queue} (total {:.2} s)",
        args.campaign,
        if publish_seconds > 0.0 { published as f64 / publish_seconds } else { 0.0 },
        already.len(),
        started.elapsed().as_secs_f64(),
    );
    // watch finds the ledger under --ledger, else the configured output_prefix.
    let ledger_flag =
        if ledger_root == config.engine.output_prefix { String::new() } else { format!(" --ledger {ledger_root}") };
    println!("follow it with: retouch watch --campaign {}{ledger_flag}", args.campaign);
    Ok(())
}

/// Flags of `retouch watch`.
#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// The campaign to follow.
    #[arg(long)]
    pub campaign: String,
    /// The report to write when done: .csv or .jsonl [default: <campaign>-report.jsonl].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Where results are kept while watching (appended; what makes a restart lossless)
    /// [default: <campaign>.results.jsonl].
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Keep the campaign's results queue when done (default: delete it).
    #[arg(long)]
    pub keep_queue: bool,
    /// Stop waiting after this long (e.g. 30m); the state is kept for the next watch.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub connection: Connection,
}

/// Reads the results kept by an earlier watch.
fn load_state(path: &PathBuf) -> anyhow::Result<BTreeMap<String, JobResult>> {
    let mut results = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(results) };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<JobResult>(line) {
            Ok(r) => {
                merge(&mut results, r);
            }
            // A line cut by a crash mid-write is the only expected damage; skip it (its result
            // was not acknowledged, so it will arrive again).
            Err(e) => tracing::warn!(line = i + 1, error = %e, "skipping an unreadable line of the state file"),
        }
    }
    Ok(results)
}

/// Counts each job once: the latest result wins, except that a success is never replaced by
/// a later duplicate of an earlier failure. Returns how the number of failed jobs changed
/// (−1, 0 or +1), so callers keep their counts without rescanning.
fn merge(results: &mut BTreeMap<String, JobResult>, r: JobResult) -> isize {
    let was_failed = match results.get(&r.job_id) {
        Some(existing) if existing.status == Status::Succeeded && r.status == Status::Failed => return 0,
        Some(existing) => existing.status == Status::Failed,
        None => false,
    };
    let now_failed = r.status == Status::Failed;
    results.insert(r.job_id.clone(), r);
    isize::from(now_failed) - isize::from(was_failed)
}

/// One row of a CSV report.
#[derive(serde::Serialize)]
struct CsvRow<'a> {
    job_id: &'a str,
    source: &'a str,
    output: &'a str,
    status: &'a str,
    error_kind: Option<&'a str>,
    error_message: Option<&'a str>,
    attempt: Option<u32>,
    duplicate: bool,
    inference_s: Option<String>,
    total_s: Option<String>,
}

/// Writes the report: one line (JSONL) or row (CSV, by the extension) per ledger entry, in
/// ledger order; jobs without a result are `missing`.
fn write_report(path: &PathBuf, ledger: &[Entry], results: &BTreeMap<String, JobResult>) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        let mut out = csv::Writer::from_writer(file);
        for entry in ledger {
            let r = results.get(&entry.job_id);
            let error = r.and_then(|r| r.error.as_ref());
            out.serialize(CsvRow {
                job_id: &entry.job_id,
                source: &entry.source,
                output: r.and_then(|r| r.output.as_deref()).unwrap_or(&entry.output),
                status: r.map_or("missing", |r| r.status.as_str()),
                error_kind: error.map(|e| e.kind.as_str()),
                error_message: error.map(|e| e.message.as_str()),
                attempt: r.map(|r| r.attempt),
                duplicate: r.is_some_and(|r| r.duplicate),
                inference_s: r.map(|r| format!("{:.3}", r.timings.inference)),
                total_s: r.map(|r| format!("{:.3}", r.timings.total)),
            })?;
        }
        out.flush()?;
    } else {
        let mut out = std::io::BufWriter::new(file);
        for entry in ledger {
            let r = results.get(&entry.job_id);
            let line = serde_json::json!({
                "job_id": entry.job_id, "source": entry.source,
                "output": r.and_then(|r| r.output.clone()).unwrap_or_else(|| entry.output.clone()),
                "status": r.map_or("missing", |r| r.status.as_str()),
                "error": r.and_then(|r| r.error.clone()),
                "attempt": r.map(|r| r.attempt), "duplicate": r.is_some_and(|r| r.duplicate),
                "timings": r.map(|r| r.timings.clone()),
            });
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// Runs `retouch watch`.
///
/// # Errors
/// Broker or storage failures; "interrupted" or "timed out" before every job has a result.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let config = args.connection.config()?;
    let ledger_root = args.connection.ledger.clone().unwrap_or_else(|| config.engine.output_prefix.clone());
    let storage = storage(&config, &[&ledger_root]).await?;
    let ledger = Ledger::open(&storage, &ledger_root, &args.campaign).await?;
    if ledger.manifest.total == 0 {
        return Err(bad_input(format!(
            "campaign {} has no ledger under {ledger_root} (submit it first, or pass --ledger)",
            args.campaign
        )));
    }
    let known = ledger.by_id();
    let state_path = args.state.clone().unwrap_or_else(|| PathBuf::from(format!("{}.results.jsonl", args.campaign)));
    let report_path = args.report.clone().unwrap_or_else(|| PathBuf::from(format!("{}-report.jsonl", args.campaign)));
    let mut results = load_state(&state_path)?;
    results.retain(|id, _| known.contains_key(id.as_str()));
    let total = ledger.manifest.total;
    let mut failed = results.values().filter(|r| r.status == Status::Failed).count();

    let progress = bar(total as u64, "{spinner} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})");
    // Jobs running now (from their progress events): id → (step, steps).
    let mut running: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let show = |done: usize, failed: usize, running: &BTreeMap<String, (u32, u32)>| {
        progress.set_position(done as u64);
        progress.set_message(watch_status(done, failed, running));
    };
    show(results.len(), failed, &running);

    let settings = config.amqp_for("watch");
    let admin = Admin::connect(settings).await.context("cannot connect to the broker")?;
    let queue = admin.declare_campaign_queue(&args.campaign).await?;
    let mut state = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&state_path)
        .with_context(|| format!("cannot open {}", state_path.display()))?;
    let started = Instant::now();
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut outcome = Ok(());
    if results.len() < total {
        let mut consumer =
            admin.consume_results(&queue, WATCH_PREFETCH).await.context("cannot consume the campaign's results")?;
        // Progress events (of jobs submitted with --progress): best effort, shown, not kept.
        let mut events = match admin.consume_progress(&args.campaign, WATCH_PREFETCH).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow progress events; running jobs are not shown");
                None
            }
        };
        let stop = crate::signals::terminated();
        tokio::pin!(stop);
        while results.len() < total {
            let next = tokio::select! {
                () = &mut stop => { outcome = Err(anyhow::anyhow!("interrupted; run the same watch again to resume")); break }
                () = sleep_until_opt(deadline) => { outcome = Err(anyhow::anyhow!("timed out; run the same watch again to resume")); break }
                event = next_event(&mut events) => {
                    match event {
                        Some(event) if !results.contains_key(&event.job_id) => {
                            running.insert(event.job_id, (event.step, event.steps));
                            show(results.len(), failed, &running);
                        }
                        Some(_) => {}
                        None => events = None,
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            let Some(message) = next.context("reading results")? else {
                outcome = Err(anyhow::anyhow!("the broker closed the consumer; run the same watch again to resume"));
                break;
            };
            match serde_json::from_slice::<JobResult>(message.body()) {
                Ok(result) => {
                    // Persist before acknowledging: a crash here repeats a result, never loses one.
                    writeln!(state, "{}", String::from_utf8_lossy(message.body()))?;
                    state.flush()?;
                    if known.contains_key(result.job_id.as_str()) {
                        running.remove(&result.job_id);
                        failed = failed.saturating_add_signed(merge(&mut results, result));
                        show(results.len(), failed, &running);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a message that is not a result"),
            }
            message.ack().await.context("acknowledging a result")?;
        }
        consumer.cancel().await.context("ending the results subscription")?;
        if let Some(events) = events {
            let _ = events.cancel().await;
        }
    }
    progress.finish_and_clear();
    let cancelled = results.values().filter(|r| r.status == Status::Cancelled).count();
    let ok = results.len() - failed - cancelled;
    if results.len() >= total {
        write_report(&report_path, &ledger.entries, &results)?;
        if !args.keep_queue {
            admin.delete_queue(&queue).await?;
        }
    }
    admin.close().await;
    println!(
        "campaign {}: {}/{total} jobs have results — {ok} succeeded, {failed} failed, {cancelled} cancelled ({:.1} s){}",
        args.campaign,
        results.len(),
        started.elapsed().as_secs_f64(),
        if results.len() >= total { format!("; report: {}", report_path.display()) } else { String::new() }
    );
    outcome?;
    if failed > 0 {
        println!("fix the cause, then: retouch dead-letters redrive --campaign {}", args.campaign);
    }
    Ok(())
}

/// The next progress event, acknowledged; `None` when the subscription is gone (and forever
/// when there is none).
async fn next_event(events: &mut Option<retouch_amqp::ResultsConsumer>) -> Option<JobEvent> {
    let Some(consumer) = events.as_mut() else { return std::future::pending().await };
    loop {
        let message = consumer.next().await.ok().flatten()?;
        let event = serde_json::from_slice::<JobEvent>(message.body()).ok();
        let _ = message.ack().await;
        if let Some(event) = event.filter(|e| matches!(e.event, EventType::Started | EventType::Progress)) {
            return Some(event);
        }
    }
}

/// The watch's status line: results so far and the jobs running now (their step of their
/// steps, from progress events; the first three by id, then how many more).
fn watch_status(done: usize, failed: usize, running: &BTreeMap<String, (u32, u32)>) -> String {
    let mut message = format!("{} succeeded, {failed} failed", done - failed);
    if !running.is_empty() {
        let shown: Vec<String> =
            running.iter().take(3).map(|(id, (step, steps))| format!("{id} {step}/{steps}")).collect();
        let more = if running.len() > 3 { format!(" +{}", running.len() - 3) } else { String::new() };
        message.push_str(&format!("; running: {}{more}", shown.join(", ")));
    }
    message
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, status: Status) -> JobResult {
        JobResult::new(id, status)
    }

    #[test]
    fn the_watch_status_names_the_first_running_jobs_and_counts_the_rest() {
        let mut running = BTreeMap::new();
        assert_eq!(watch_status(7, 2, &running), "5 succeeded, 2 failed");
        running.insert("b".to_string(), (3, 20));
        running.insert("a".to_string(), (19, 20));
        assert_eq!(watch_status(0, 0, &running), "0 succeeded, 0 failed; running: a 19/20, b 3/20");
        running.insert("c".to_string(), (1, 4));
        running.insert("d".to_string(), (2, 4));
        running.insert("e".to_string(), (0, 4));
        assert_eq!(watch_status(10, 1, &running), "9 succeeded, 1 failed; running: a 19/20, b 3/20, c 1/4 +2");
    }

    #[test]
    fn the_csv_report_quotes_what_needs_quoting_and_marks_missing_jobs() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("report.csv");
        let entry = |id: &str| Entry {
            job_id: id.into(),
            source: format!("s3://in/{id},v2.png"),
            output: format!("s3://out/{id}.png"),
        };
        let failed = JobResult {
            attempt: 3,
            error: Some(retouch_core::job::ResultError {
                kind: retouch_core::error::ErrorKind::Storage,
                message: "503 \"SlowDown\", retry\nlater".into(),
                retryable: true,
            }),
            ..result("a", Status::Failed)
        };
        let results = BTreeMap::from([("a".to_string(), failed)]);
        write_report(&path, &[entry("a"), entry("b")], &results).expect("report");

        let mut reader = csv::Reader::from_path(&path).expect("csv");
        let header: Vec<String> = reader.headers().expect("header").iter().map(String::from).collect();
        assert_eq!(
            header.join(","),
            "job_id,source,output,status,error_kind,error_message,attempt,duplicate,inference_s,total_s"
        );
        let rows: Vec<Vec<String>> =
            reader.records().map(|r| r.expect("row").iter().map(String::from).collect()).collect();
        assert_eq!(
            rows[0],
            [
                "a",
                "s3://in/a,v2.png",
                "s3://out/a.png",
                "failed",
                "storage",
                "503 \"SlowDown\", retry\nlater",
                "3",
                "false",
                "0.000",
                "0.000"
            ]
        );
        assert_eq!(rows[1], ["b", "s3://in/b,v2.png", "s3://out/b.png", "missing", "", "", "", "false", "", ""]);
    }

    #[test]
    fn duplicates_count_once_and_a_redriven_success_wins() {
        let mut r = BTreeMap::new();
        assert_eq!(merge(&mut r, result("a", Status::Failed)), 1);
        assert_eq!(merge(&mut r, result("a", Status::Succeeded)), -1);
        assert_eq!(merge(&mut r, result("a", Status::Failed)), 0);
        assert_eq!(merge(&mut r, result("b", Status::Succeeded)), 0);
        assert_eq!(merge(&mut r, result("b", Status::Succeeded)), 0);

        assert_eq!(r.len(), 2);
        assert_eq!(r["a"].status, Status::Succeeded);
        let mut again = BTreeMap::new();
        assert_eq!(merge(&mut again, result("c", Status::Failed)), 1);
        assert_eq!(merge(&mut again, result("c", Status::Failed)), 0, "a repeated failure counts once");
    }
}
