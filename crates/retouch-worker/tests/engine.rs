//! The engine's job life against in-process doubles: a fake editor (inverts images, records
//! batch sizes, fails or panics on request), the local queue and filesystem store, and a store
//! wrapper that injects transient failures. The real broker and S3 are covered end to end in
//! `tests/` at the workspace root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::{Rgb, RgbImage};
use retouch_core::editor::{EditBatch, EditError, EditErrorKind, EditObserver, EditedImage, Editor, ModelInfo};
use retouch_core::error::ErrorKind;
use retouch_core::job::{JobResult, ObjectUrl, Status};
use retouch_core::params::SchedulerKind;
use retouch_core::queue::{DeliveryInfo, JobSource, QueueCounters, QueueError, ResultSink};
use retouch_core::store::{ObjectMeta, ObjectStore, StoreError};
use retouch_worker::backend::Backend;
use retouch_worker::engine::{self, EngineSettings};
use retouch_worker::local::{FsStore, LocalDelivery, LocalQueue};
use retouch_worker::metrics::Metrics;

/// Inverts every image; records batch sizes; fails batches of several when asked; panics on
/// the instruction "panic"; plays a safety checker that flags the instruction "flag me" (black
/// image, `nsfw_content_detected: true`); sleeps `step_delay` per request to make timing visible;
/// holds its first batch at a [`Gate`] when given one.
struct FakeEditor {
    info: ModelInfo,
    batches: Arc<Mutex<Vec<usize>>>,
    fail_multi: bool,
    step_delay: Duration,
    gate: Option<Gate>,
}

/// Holds the first batch after its last step (no cancellation check left, so it will
/// succeed) until the test opens the gate: `started` tells the test a batch is running.
struct Gate {
    started: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    open: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Gate {
    /// The gate, the "a batch is running" signal, and the key that opens the gate.
    fn new() -> (Self, tokio::sync::oneshot::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (started, running) = tokio::sync::oneshot::channel();
        let (key, open) = std::sync::mpsc::channel();
        (Self { started: Mutex::new(Some(started)), open: Mutex::new(open) }, running, key)
    }

    /// On the first call only: signals, then waits for the key (or for its owner to go).
    fn hold(&self) {
        let Some(started) = self.started.lock().expect("lock").take() else { return };
        let _ = started.send(());
        let _ = self.open.lock().expect("lock").recv();
    }
}

impl Editor for FakeEditor {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn edit(&self, batch: &EditBatch, observer: &mut dyn EditObserver) -> Result<Vec<EditedImage>, EditError> {
        self.batches.lock().expect("lock").push(batch.requests.len());
        if self.fail_multi && batch.requests.len() > 1 {
            return Err(EditError { kind: EditErrorKind::Model, message: "out of memory".into() });
        }
        for step in 0..batch.steps as usize {
            if observer.cancelled() {
                return Err(EditError { kind: EditErrorKind::Cancelled, message: "cancelled".into() });
            }
            std::thread::sleep(self.step_delay);
            observer.on_step(step + 1, batch.steps as usize, Duration::ZERO);
        }
        if let Some(gate) = &self.gate {
            gate.hold();
        }
        batch
            .requests
            .iter()
            .map(|r| {
                assert!(r.instruction != "panic", "the editor met a poisonous instruction");
                let mut image = r.image.clone();
                image.pixels_mut().for_each(|p| p.0 = p.0.map(|v| 255 - v));
                let flagged = r.instruction == "flag me";
                if flagged {
                    image.as_mut().fill(0);
                }
                Ok(EditedImage { image, instruction_truncated: false, nsfw_content_detected: Some(flagged) })
            })
            .collect()
    }
}

/// Fails the first `failures` GETs with a transient error, then delegates.
struct FlakyStore {
    inner: FsStore,
    failures: AtomicUsize,
}

impl ObjectStore for FlakyStore {
    async fn get(&self, url: &ObjectUrl, max: u64) -> Result<Vec<u8>, StoreError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Transient("503 SlowDown".into()));
        }
        self.inner.get(url, max).await
    }
    async fn head(&self, url: &ObjectUrl) -> Result<Option<ObjectMeta>, StoreError> {
        self.inner.head(url).await
    }
    async fn put(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        ct: &str,
        meta: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.inner.put(url, body, ct, meta).await
    }
}

#[derive(Default)]
struct Results(Mutex<Vec<JobResult>>);

impl ResultSink for Results {
    async fn publish(
        &self,
        result: &JobResult,
        _info: &DeliveryInfo,
        _webhook: Option<&str>,
    ) -> Result<(), QueueError> {
        self.0.lock().expect("lock").push(result.clone());
        Ok(())
    }
}

impl Results {
    fn all(&self) -> Vec<JobResult> {
        self.0.lock().expect("lock").clone()
    }
}

struct World {
    dir: PathBuf,
    batches: Arc<Mutex<Vec<usize>>>,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    /// Holds `dir`; removed with the world.
    _tmp: tempfile::TempDir,
}

fn world(name: &str, fail_multi: bool, step_delay: Duration) -> World {
    world_with(name, fail_multi, step_delay, None)
}

fn world_with(name: &str, fail_multi: bool, step_delay: Duration, gate: Option<Gate>) -> World {
    let tmp = tempfile::Builder::new().prefix(&format!("retouch-engine-{name}-")).tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("in")).expect("mkdir");
    let batches = Arc::new(Mutex::new(Vec::new()));
    let metrics = Arc::new(Metrics::new(Arc::new(QueueCounters::default())));
    let editor = FakeEditor {
        info: ModelInfo {
            name: "fake".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            size_multiple: 8,
            default_scheduler: Some(SchedulerKind::EulerAncestral),
        },
        batches: batches.clone(),
        fail_multi,
        step_delay,
        gate,
    };
    let backend = Arc::new(Backend::spawn(move || Ok(Box::new(editor) as Box<dyn Editor>), metrics.clone(), "test"));
    World { dir, batches, backend, metrics, _tmp: tmp }
}

fn settings(dir: &Path, max_batch: usize) -> EngineSettings {
    EngineSettings {
        output_prefix: format!("file://{}/out", dir.display()),
        max_batch,
        max_batch_wait: Duration::from_millis(50),
        job_timeout: Duration::from_secs(30),
        shutdown_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        worker_name: "test-worker".into(),
        ..EngineSettings::default()
    }
}

fn write_png(path: &Path, w: u32, h: u32, shade: u8) {
    RgbImage::from_fn(w, h, |x, y| Rgb([shade, x as u8, y as u8])).save(path).expect("png");
}

fn job(id: &str, source: &Path, extra: &str) -> (String, Vec<u8>) {
    let body =
        format!(r#"{{"job_id":"{id}","source":"file://{}","instruction":"make it snowy"{extra}}}"#, source.display());
    (id.to_string(), body.into_bytes())
}

async fn run(
    w: &World,
    queue: LocalQueue,
    store: impl ObjectStore,
    max_batch: usize,
) -> (engine::Summary, Arc<Results>) {
    run_with(w, queue, store, settings(&w.dir, max_batch)).await
}

async fn run_with(
    w: &World,
    queue: LocalQueue,
    store: impl ObjectStore,
    settings: EngineSettings,
) -> (engine::Summary, Arc<Results>) {
    let sink = Arc::new(Results::default());
    let summary = engine::run(
        settings,
        queue,
        Arc::new(store),
        sink.clone(),
        w.backend.clone(),
        w.metrics.clone(),
        engine::Control::default(),
        std::future::pending(),
    )
    .await
    .expect("engine runs");
    (summary, sink)
}

// Paused clock: the batch window and the retry backoffs cost no wall time, and nothing
// depends on how fast this machine is.
#[tokio::test(start_paused = true)]
async fn jobs_are_batched_by_size_and_produce_outputs_and_results() {
    let w = world("batch", false, Duration::from_millis(1));
    let mut jobs = Vec::new();
    for i in 0..5 {
        let (wd, ht) = if i < 4 { (64, 32) } else { (48, 48) };
        let path = w.dir.join(format!("in/{i}.png"));
        write_png(&path, wd, ht, i as u8 * 10);
        jobs.push(job(&format!("job-{i}"), &path, ""));
    }
    let (summary, results) = run(&w, LocalQueue::new(jobs, 2), FsStore, 4).await;
    assert_eq!(summary.succeeded, 5);
    let results = results.all();
    assert_eq!(results.len(), 5);
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        let out =
            image::open(r.output.as_deref().expect("output").trim_start_matches("file://")).expect("png").to_rgb8();
        assert_eq!((out.width(), out.height()), (r.width.expect("w"), r.height.expect("h")));
    }
    let mut sizes = w.batches.lock().expect("lock").clone();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 4], "four 64×32 jobs share one call, the 48×48 one runs alone");
    assert!(w.metrics.render().contains(r#"retouch_jobs_total{error_kind="none",outcome="succeeded"} 5"#));
}

#[tokio::test]
async fn bad_jobs_fail_with_the_right_kind_and_are_dead_lettered() {
    let w = world("bad", false, Duration::ZERO);
    let good = w.dir.join("in/good.png");
    write_png(&good, 16, 16, 1);
    let not_image = w.dir.join("in/notes.png");
    std::fs::write(&not_image, b"definitely not a png").expect("write");
    let tiny = w.dir.join("in/tiny.png");
    write_png(&tiny, 4, 4, 1);
    let jobs = vec![
        ("garbage".to_string(), b"{ not json".to_vec()),
        job("unknown-key", &good, r#","colour":"red""#),
        job("bad-scheduler", &good, r#","params":{"scheduler":"pndm"}"#),
        job("missing", &w.dir.join("in/missing.png"), ""),
        job("not-image", &not_image, ""),
        job("too-small", &tiny, ""),
        job("ok", &good, ""),
        // Invalid, but its id and campaign are readable: the failure result is routed by them.
        ("msg-7".to_string(), br#"{"job_id":"j-7","campaign_id":"spring","instruction":"x","colour":1}"#.to_vec()),
    ];
    let queue = LocalQueue::new(jobs, 3);
    let (summary, results) = run(&w, queue.clone(), FsStore, 2).await;
    assert_eq!(summary.failed, 7);
    assert_eq!(summary.succeeded, 1);
    let kinds: BTreeMap<String, ErrorKind> =
        results.all().into_iter().filter_map(|r| r.error.map(|e| (r.job_id, e.kind))).collect();
    assert_eq!(kinds["garbage"], ErrorKind::InvalidJob);
    assert_eq!(kinds["unknown-key"], ErrorKind::InvalidJob);
    assert_eq!(kinds["bad-scheduler"], ErrorKind::InvalidJob);
    assert_eq!(kinds["missing"], ErrorKind::SourceNotFound);
    assert_eq!(kinds["not-image"], ErrorKind::InvalidImage);
    assert_eq!(kinds["too-small"], ErrorKind::InvalidImage);
    let routed = results.all().into_iter().find(|r| r.job_id == "j-7").expect("the result names the job id");
    assert_eq!((routed.campaign_id.as_deref(), routed.routing_key().as_str()), (Some("spring"), "failed.spring"));
    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 7);
    assert!(dead.iter().all(|d| d.attempt == 1), "permanent failures are not retried");
    let unknown = dead.iter().find(|d| d.message_id == "unknown-key").expect("dead letter");
    assert!(unknown.error.message.contains("colour"), "{}", unknown.error.message);
    assert!(String::from_utf8_lossy(&unknown.body).contains("colour"), "the body is kept");
}

// Paused clock: the batch window and the retry backoffs cost no wall time, and nothing
// depends on how fast this machine is.
#[tokio::test(start_paused = true)]
async fn transient_storage_failures_are_retried_then_succeed_or_dead_letter() {
    let w = world("flaky", false, Duration::ZERO);
    let src = w.dir.join("in/a.png");
    write_png(&src, 16, 16, 7);
    // Two failures, limit 3: the third delivery succeeds.
    let store = FlakyStore { inner: FsStore, failures: AtomicUsize::new(2) };
    let (summary, results) = run(&w, LocalQueue::new([job("a", &src, "")], 3), store, 1).await;
    assert_eq!(summary.retried, 2);
    let r = results.all();
    assert_eq!((r.len(), r[0].status, r[0].attempt), (1, Status::Succeeded, 3));

    // Failing for good: 1 + limit deliveries, then a failure result and a dead letter.
    let store = FlakyStore { inner: FsStore, failures: AtomicUsize::new(100) };
    let queue = LocalQueue::new([job("b", &src, "")], 2);
    let (summary, results) = run(&w, queue.clone(), store, 1).await;
    assert_eq!(summary.retried, 2);
    let r = results.all();
    assert_eq!(r.len(), 1);
    let error = r[0].error.clone().expect("error");
    assert_eq!((error.kind, error.retryable, r[0].attempt), (ErrorKind::Storage, true, 3));
    assert_eq!(queue.dead_letters().len(), 1);
}

#[tokio::test]
async fn a_redelivered_job_whose_output_exists_is_a_duplicate() {
    let w = world("dup", false, Duration::ZERO);
    let src = w.dir.join("in/a.png");
    write_png(&src, 16, 16, 7);
    let (_, first) = run(&w, LocalQueue::new([job("same", &src, "")], 2), FsStore, 1).await;
    assert!(!first.all()[0].duplicate);
    let calls = w.batches.lock().expect("lock").len();
    let (summary, second) = run(&w, LocalQueue::new([job("same", &src, "")], 2), FsStore, 1).await;
    let r = &second.all()[0];
    assert!(r.duplicate && r.status == Status::Succeeded && r.width == Some(16), "{r:?}");
    assert_eq!(summary.duplicate, 1);
    assert_eq!(w.batches.lock().expect("lock").len(), calls, "no inference for a duplicate");
}

#[tokio::test]
async fn flagged_images_are_written_black_and_counted_or_blocked_with_kind_nsfw() {
    let w = world("nsfw", false, Duration::ZERO);
    let src = w.dir.join("in/a.png");
    write_png(&src, 16, 16, 7);
    let flag = |id: &str| {
        let body = format!(r#"{{"job_id":"{id}","source":"file://{}","instruction":"flag me"}}"#, src.display());
        (id.to_string(), body.into_bytes())
    };
    // Default: the black image is the output, the result and the metric say so.
    let jobs = vec![flag("black"), job("clean", &src, "")];
    let (summary, results) = run(&w, LocalQueue::new(jobs, 2), FsStore, 2).await;
    assert_eq!(summary.succeeded, 2);
    let by_id: BTreeMap<String, JobResult> = results.all().into_iter().map(|r| (r.job_id.clone(), r)).collect();
    assert_eq!(by_id["black"].nsfw_content_detected, Some(true));
    assert_eq!(by_id["clean"].nsfw_content_detected, Some(false));
    let out = image::open(by_id["black"].output.as_deref().expect("output").trim_start_matches("file://"))
        .expect("png")
        .to_rgb8();
    assert!(out.as_raw().iter().all(|&v| v == 0), "a flagged output is black");
    assert!(w.metrics.render().contains("retouch_nsfw_flagged_total 1"), "{}", w.metrics.render());
    // A redelivery finds the output and repeats the verdict without running the model.
    let (_, again) = run(&w, LocalQueue::new(vec![flag("black")], 2), FsStore, 1).await;
    let r = &again.all()[0];
    assert!(r.duplicate && r.nsfw_content_detected == Some(true), "{r:?}");

    // block: a permanent `nsfw` failure, dead-lettered once, no output written.
    let settings = EngineSettings { block_nsfw: true, ..settings(&w.dir, 2) };
    let queue = LocalQueue::new(vec![flag("blocked"), job("fine", &src, "")], 3);
    let (summary, results) = run_with(&w, queue.clone(), FsStore, settings).await;
    assert_eq!((summary.succeeded, summary.failed), (1, 1));
    let blocked = results.all().into_iter().find(|r| r.job_id == "blocked").expect("result");
    let error = blocked.error.clone().expect("error");
    assert_eq!((blocked.status, error.kind, error.retryable), (Status::Failed, ErrorKind::Nsfw, false));
    assert_eq!((blocked.output.as_deref(), blocked.nsfw_content_detected), (None, Some(true)));
    assert!(!w.dir.join("out/blocked.png").exists(), "no output under block");
    let dead = queue.dead_letters();
    assert_eq!((dead.len(), dead[0].message_id.as_str(), dead[0].attempt), (1, "blocked", 1));
    let metrics = w.metrics.render();
    assert!(metrics.contains(r#"retouch_jobs_total{error_kind="nsfw",outcome="failed"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"retouch_dead_letters_total{error_kind="nsfw"} 1"#), "{metrics}");
    assert!(metrics.contains("retouch_nsfw_flagged_total 2"), "{metrics}");
}

#[tokio::test]
async fn a_failing_batch_is_retried_one_job_at_a_time() {
    let w = world("split", true, Duration::ZERO);
    let mut jobs = Vec::new();
    for i in 0..3 {
        let path = w.dir.join(format!("in/{i}.png"));
        write_png(&path, 16, 16, i);
        jobs.push(job(&format!("j{i}"), &path, ""));
    }
    let (summary, _) = run(&w, LocalQueue::new(jobs, 2), FsStore, 3).await;
    assert_eq!(summary.succeeded, 3);
    assert_eq!(w.batches.lock().expect("lock").clone(), vec![3, 1, 1, 1]);
}

#[tokio::test]
async fn a_panicking_model_fails_the_job_not_the_worker() {
    let w = world("panic", false, Duration::ZERO);
    let src = w.dir.join("in/a.png");
    write_png(&src, 16, 16, 7);
    let poison = format!(r#"{{"job_id":"poison","source":"file://{}","instruction":"panic"}}"#, src.display());
    let queue = LocalQueue::new([("poison".to_string(), poison.into_bytes()), job("fine", &src, "")], 1);
    let (summary, results) = run(&w, queue, FsStore, 1).await;
    assert_eq!(summary.succeeded, 1);
    let poison = results.all().into_iter().find(|r| r.job_id == "poison").expect("result");
    assert_eq!(poison.error.expect("error").kind, ErrorKind::Model);
}

/// The jobs queue with two facts a shutdown test waits for: how many deliveries were handed
/// out, and (through the gate's key) that the engine closed it, i.e. stopped receiving.
struct Closing {
    inner: LocalQueue,
    received: tokio::sync::watch::Sender<usize>,
    closed: std::sync::mpsc::Sender<()>,
}

impl JobSource for Closing {
    type Delivery = LocalDelivery;

    async fn next(&mut self) -> Result<Option<LocalDelivery>, QueueError> {
        let next = self.inner.next().await?;
        if next.is_some() {
            self.received.send_modify(|n| *n += 1);
        }
        Ok(next)
    }

    async fn close(&mut self) -> Result<(), QueueError> {
        self.inner.close().await?;
        let _ = self.closed.send(());
        Ok(())
    }
}

// Real time on purpose, and no clock in the test: the model runs on an OS thread that a paused
// clock cannot see (while it works the runtime is idle, and a paused clock would jump straight
// to the shutdown deadline). The stop comes when a batch is running and every job has been
// received; the batch ends only after the engine has stopped receiving.
#[tokio::test]
async fn shutdown_gives_back_unstarted_jobs_and_finishes_the_running_batch() {
    let (gate, running, key) = Gate::new();
    let w = world_with("stop", false, Duration::ZERO, Some(gate));
    let mut jobs = Vec::new();
    for i in 0..6 {
        let path = w.dir.join(format!("in/{i}.png"));
        write_png(&path, 16, 16, i);
        jobs.push(job(&format!("s{i}"), &path, r#","params":{"steps":10}"#));
    }
    let queue = LocalQueue::new(jobs, 2);
    let (received, mut handed_out) = tokio::sync::watch::channel(0);
    let source = Closing { inner: queue.clone(), received, closed: key };
    let sink = Arc::new(Results::default());
    let stop = async move {
        running.await.expect("a batch reaches the model");
        handed_out.wait_for(|n| *n == 6).await.expect("every job is received");
    };
    let summary = engine::run(
        settings(&w.dir, 2),
        source,
        Arc::new(FsStore),
        sink.clone(),
        w.backend.clone(),
        w.metrics.clone(),
        engine::Control::default(),
        stop,
    )
    .await
    .expect("engine");
    let (done, released) = (summary.succeeded, summary.released);
    assert_eq!(done, 2, "the running batch of 2 finished");
    assert_eq!(released, 4, "the other jobs were given back");
    assert_eq!(queue.released().len(), 4);
    assert_eq!(sink.all().len(), 2, "a result for each finished job, none for the others");
    assert!(queue.dead_letters().is_empty());
}
