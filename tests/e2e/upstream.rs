//! The features upstream services use, end to end against the real broker and S3 server:
//! progress events, cancellation (queued, batched, running, before a worker exists, after a
//! job finished), priorities, and signed webhooks with a real HTTP receiver in the test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use retouch_core::job::{JobResult, Priority, Status};
use retouch_e2e::{
    Broker, CancelRequest, Env, EventType, JobPublishOptions, S3Server, Worker, command, run_cli, test_png, unique,
    wait_for,
};
use serde_json::json;

/// The webhook secret of these tests (Standard Webhooks `whsec_` + base64 of 32 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

fn setup(test: &str) -> (Env, String, S3Server, Broker) {
    let env = Env::get();
    let name = unique(test);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..4 {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 17));
    }
    s3.put("inputs", "big.png", &big_png(128));
    let broker = Broker::new(&env.amqp_url, &name, 5);
    (env, name, s3, broker)
}

/// A larger source, so that a model call lasts long enough to be cancelled in the middle.
fn big_png(size: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(size, size, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

fn job(id: &str, source: &str, steps: u32) -> serde_json::Value {
    json!({"job_id": id, "source": format!("s3://inputs/{source}"), "instruction": "make it snowy",
           "params": {"steps": steps, "seed": 7}})
}

fn output_bytes(s3: &S3Server, result: &JobResult) -> Vec<u8> {
    let url = result.output.as_deref().expect("output");
    let (bucket, key) = url.trim_start_matches("s3://").split_once('/').expect("s3 url");
    s3.get(bucket, key).unwrap_or_else(|| panic!("{url} is missing"))
}

#[test]
fn progress_events_arrive_in_order_throttled_and_end_at_the_last_step() {
    let (_env, name, s3, mut broker) = setup("progress");
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[("RETOUCH_ENGINE_MAX_BATCH", "1")]);
    worker.wait_ready();
    let mut watched = job("watched", "big.png", 60);
    watched["events"] = json!(["progress"]);
    let replies = broker.declare_queue("replies");
    let options = JobPublishOptions { reply_to: Some(replies), ..JobPublishOptions::default() };
    broker.publish_many(&[watched], &options);
    broker.publish_json(&job("quiet", "img0.png", 3));
    let results = broker.results_until(Duration::from_secs(300), |r| r.len() >= 2);
    assert!(results.values().all(|r| r.status == Status::Succeeded), "{results:?}");
    broker.drain_results();
    let events: Vec<_> = broker.events.iter().filter(|e| e.job_id == "watched").cloned().collect();
    assert!(broker.events.iter().all(|e| e.job_id == "watched"), "only the job that asked gets events");
    assert!(events.len() >= 3, "started, at least one progress, the last step: {events:?}");
    assert_eq!(
        (events[0].event, events[0].step, events[0].steps, events[0].batch_size),
        (EventType::Started, 0, 60, 1)
    );
    let progress = &events[1..];
    assert!(progress.iter().all(|e| e.event == EventType::Progress && e.worker == name), "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0].step < w[1].step), "in order: {progress:?}");
    assert_eq!(progress.last().map(|e| e.step), Some(60), "the last step is always sent");
    // Throttled: at most one a second, apart from the last step.
    for w in progress[..progress.len() - 1].windows(2) {
        assert!(w[1].elapsed - w[0].elapsed >= 0.99, "two progress events within a second: {w:?}");
    }
    let wall = results["watched"].timings.inference;
    assert!(progress.len() as f64 <= wall + 2.0, "{} progress events in a {wall:.1} s call", progress.len());
    let published = worker.metric(r#"retouch_progress_events_total{outcome="published"}"#).expect("metric");
    assert_eq!(published as usize, events.len());
    // The job's reply_to got the same events and its result.
    let replied = broker.drain("replies");
    let (results, events_replied): (Vec<_>, Vec<_>) =
        replied.iter().partition(|(body, _)| serde_json::from_slice::<JobResult>(body).is_ok());
    assert_eq!(results.len(), 1, "one result on reply_to");
    let replied_steps: Vec<u32> = events_replied
        .iter()
        .map(|(body, _)| serde_json::from_slice::<retouch_e2e::JobEvent>(body).expect("an event").step)
        .collect();
    assert_eq!(replied_steps, events.iter().map(|e| e.step).collect::<Vec<_>>(), "the same events, in order");
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_cancel_sent_before_any_worker_applies_to_queued_jobs_without_touching_s3() {
    let (_env, name, s3, mut broker) = setup("cancel-queued");
    // Its output bucket does not exist: any S3 access would fail the job, not cancel it.
    let mut doomed = job("doomed", "img0.png", 2);
    doomed["output"] = json!("s3://no-such-bucket/doomed.png");
    broker.publish_json(&doomed);
    broker.publish_json(&job("kept", "img1.png", 2));
    let mut campaign_job = job("c-1", "img2.png", 2);
    campaign_job["campaign_id"] = json!("abandoned");
    broker.publish_json(&campaign_job);
    broker.cancel(&CancelRequest { job_ids: vec!["doomed".into()], ..CancelRequest::default() });
    broker.cancel(&CancelRequest { campaign_id: Some("abandoned".into()), ..CancelRequest::default() });

    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[]);
    worker.wait_ready();
    let results = broker.results_until(Duration::from_secs(120), |r| r.len() >= 3);
    assert_eq!(results["doomed"].status, Status::Cancelled, "{:?}", results["doomed"]);
    assert_eq!(results["c-1"].status, Status::Cancelled);
    assert_eq!(results["kept"].status, Status::Succeeded);
    assert!(results["doomed"].output.is_none() && results["doomed"].error.is_none());
    assert!(s3.get("outputs", &format!("{name}/c-1.png")).is_none(), "a cancelled job writes no output");
    assert_eq!(broker.ready("jobs"), 0);
    assert!(broker.dead_letters().is_empty(), "cancelled jobs are acked, not dead-lettered");
    assert_eq!(worker.metric(r#"retouch_jobs_total{error_kind="none",outcome="cancelled"}"#), Some(2.0));
    assert_eq!(worker.metric("retouch_cancel_requests_total"), Some(2.0));
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn cancel_of_a_running_job_leaves_its_batch_mate_bit_identical_and_of_a_batched_job() {
    let (_env, name, s3, mut broker) = setup("cancel-running");
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "2"), ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "3s")];
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();

    // Two compatible jobs share one model call; the first is cancelled once it is running.
    let mut running = job("running", "big.png", 40);
    running["events"] = json!(["progress"]);
    let mut mate = job("mate", "big.png", 40);
    mate["params"]["seed"] = json!(99);
    broker.publish_json(&running);
    broker.publish_json(&mate);
    wait_for("the running job's first progress event", Duration::from_secs(120), || {
        broker.drain_results();
        broker.events.iter().any(|e| e.job_id == "running" && e.event == EventType::Progress).then_some(())
    });
    let cancelled_at = Instant::now();
    broker.cancel(&CancelRequest { job_ids: vec!["running".into()], ..CancelRequest::default() });
    let first = broker.results_in_order(1, Duration::from_secs(120));
    let latency = cancelled_at.elapsed();
    assert_eq!((first[0].job_id.as_str(), first[0].status), ("running", Status::Cancelled), "{first:?}");
    eprintln!("cancel latency of a running job (publish → cancelled result): {:.3} s", latency.as_secs_f64());
    let rest = broker.results_until(Duration::from_secs(300), |r| r.contains_key("mate"));
    assert_eq!(rest["mate"].status, Status::Succeeded);
    assert!(s3.get("outputs", &format!("{name}/running.png")).is_none());
    worker.wait_for_log("during its model call", Duration::from_secs(10));

    // The batch-mate's bytes equal its solo run (same seed and parameters, another id).
    let mut solo = mate.clone();
    solo["job_id"] = json!("mate-solo");
    broker.publish_json(&solo);
    let alone = broker.results_until(Duration::from_secs(300), |r| r.contains_key("mate-solo"));
    assert!(output_bytes(&s3, &rest["mate"]) == output_bytes(&s3, &alone["mate-solo"]), "batch-mate bytes differ");

    // A job waiting in the batcher (max_batch_wait 3 s, no companion) is cancelled there.
    broker.publish_json(&job("waiting", "img3.png", 2));
    wait_for("the job to be decoded and waiting", Duration::from_secs(30), || {
        worker.metric(r#"retouch_stage_duration_seconds_count{stage="decode"}"#).filter(|n| *n >= 4.0)
    });
    broker.cancel(&CancelRequest { job_ids: vec!["waiting".into()], ..CancelRequest::default() });
    let waited = broker.results_until(Duration::from_secs(60), |r| r.contains_key("waiting"));
    assert_eq!(waited["waiting"].status, Status::Cancelled);
    worker.wait_for_log("waiting for the model", Duration::from_secs(10));
    wait_for("both cancels to be counted", Duration::from_secs(10), || {
        worker.metric(r#"retouch_jobs_total{error_kind="none",outcome="cancelled"}"#).filter(|n| *n == 2.0)
    });

    // Cancelling a finished job answers so and changes nothing.
    let (code, out, err) = run_cli(command(&name, &broker.worker_env(5), &s3, &[]), &["cancel", "--job", "mate"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job mate: already finished"), "{out}");
    assert!(out.contains("nothing to cancel"), "{out}");
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_high_priority_job_overtakes_a_backlog_of_200_normal_jobs() {
    let (_env, name, s3, mut broker) = setup("priority");
    let backlog: Vec<_> = (0..200).map(|i| job(&format!("bulk-{i:03}"), &format!("img{}.png", i % 4), 1)).collect();
    broker.publish_many(&backlog, &JobPublishOptions::default());
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "4"), ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "50ms")];
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();
    // Results already published when the urgent job goes out were never behind it: read them
    // all, not only the first eight (the test may lag the worker under load).
    let mut early = broker.results_in_order(8, Duration::from_secs(120));
    early.extend(broker.drain_results().into_values());
    assert!(early.iter().all(|r| r.status == Status::Succeeded));
    let before = early.len();
    let mut urgent = job("urgent", "img0.png", 1);
    urgent["priority"] = json!("high");
    broker.publish_many(&[urgent], &JobPublishOptions { priority: Priority::High, ..JobPublishOptions::default() });
    let order = broker.results_in_order(201 - before, Duration::from_secs(600));
    let position = order.iter().position(|r| r.job_id == "urgent").expect("the urgent job finished");
    // Ahead of it at most what the worker already held (prefetch 12) and the batch running.
    eprintln!("the high-priority job finished after {} of the remaining normal jobs", position);
    assert!(position <= 16, "the high-priority job waited behind {position} normal jobs");
    assert!(order.iter().all(|r| r.status == Status::Succeeded));
    assert_eq!(broker.ready("jobs") + broker.ready("jobs.high"), 0);
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

/// A webhook receiver in the test: answers the first `failures` requests with 503, then 204
/// (or 503 for as long as `refusing` is set); keeps every request.
struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Debug)]
struct Request {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Receiver {
    fn start(failures: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, c, f) = (requests.clone(), connections.clone(), refusing.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, f) = (r.clone(), f.clone());
                std::thread::spawn(move || serve(stream, &r, &f, failures));
            }
        });
        Self { port, requests, connections, refusing }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }
}

fn serve(
    mut stream: TcpStream,
    requests: &Mutex<Vec<Request>>,
    refusing: &std::sync::atomic::AtomicBool,
    failures: usize,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).expect("body");
        let mut all = requests.lock().expect("lock");
        let status = if all.len() < failures || refusing.load(Ordering::SeqCst) { 503 } else { 204 };
        all.push(Request { headers, body, status });
        drop(all);
        let reason = if status == 204 { "No Content" } else { "Service Unavailable" };
        let _ = write!(stream, "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n");
    }
}

/// Verifies a request's Standard Webhooks signature with an HMAC computed here.
fn signature_ok(request: &Request) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_")).expect("secret");
    let (id, ts) = (&request.headers["webhook-id"], &request.headers["webhook-timestamp"]);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    request.headers["webhook-signature"].split(' ').any(|s| s == expected)
}

fn webhook_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RETOUCH_WEBHOOKS_SECRET", SECRET.to_string()),
        ("RETOUCH_WEBHOOKS_ALLOW_HOSTS", format!("127.0.0.1:{port}")),
        ("RETOUCH_WEBHOOKS_ALLOW_HTTP", "true".into()),
        ("RETOUCH_WEBHOOKS_RETRY_BACKOFF", "200ms".into()),
        ("RETOUCH_WEBHOOKS_RETRY_BACKOFF_MAX", "500ms".into()),
        ("RETOUCH_WEBHOOKS_TIMEOUT", "2s".into()),
    ]
}

#[test]
fn webhooks_are_signed_retried_durable_across_kill_9_and_never_sent_to_other_hosts() {
    let (_env, name, s3, mut broker) = setup("webhooks");
    let receiver = Receiver::start(3);
    let stranger = Receiver::start(0);
    let env = webhook_env(receiver.port);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();

    // Fails 3 times, then gets exactly the signed result.
    let mut hooked = job("hooked", "img0.png", 2);
    hooked["webhook"] = json!({"url": format!("http://127.0.0.1:{}/hooks/retouch", receiver.port)});
    broker.publish_json(&hooked);
    let result = broker.results_until(Duration::from_secs(60), |r| r.contains_key("hooked"))["hooked"].clone();
    assert_eq!(result.status, Status::Succeeded);
    let requests = wait_for("a delivered webhook", Duration::from_secs(60), || {
        let r = receiver.requests();
        r.iter().any(|q| q.status == 204).then_some(r)
    });
    assert_eq!(requests.len(), 4, "3 failures, then the delivery: {requests:?}");
    for r in &requests {
        assert!(signature_ok(r), "bad signature: {r:?}");
        assert_eq!(r.headers["webhook-id"], requests[0].headers["webhook-id"], "one id across retries");
        assert_eq!(r.headers["content-type"], "application/json");
        let delivered: JobResult = serde_json::from_slice(&r.body).expect("result json");
        assert_eq!(delivered, result, "the webhook carries the published result");
    }
    wait_for("the delivery metric", Duration::from_secs(10), || {
        worker.metric(r#"retouch_webhook_deliveries_total{outcome="delivered"}"#).filter(|n| *n == 1.0)
    });

    // A host that is not on the allow-list is never contacted: the job is refused at once.
    let mut elsewhere = job("elsewhere", "img1.png", 2);
    elsewhere["webhook"] = json!({"url": format!("http://127.0.0.1:{}/steal", stranger.port)});
    broker.publish_json(&elsewhere);
    let refused = broker.results_until(Duration::from_secs(60), |r| r.contains_key("elsewhere"))["elsewhere"].clone();
    assert_eq!(refused.status, Status::Failed);
    let error = refused.error.expect("error");
    assert!(error.message.contains("webhook") && error.message.contains("127.0.0.1"), "{}", error.message);

    // Durable: the receiver is down while the job is acked; the worker is killed -9 before
    // it could deliver; a new worker delivers it.
    receiver.refusing.store(true, Ordering::SeqCst);
    let mut durable = job("durable", "img2.png", 2);
    durable["webhook"] = hooked["webhook"].clone();
    broker.publish_json(&durable);
    let acked = broker.results_until(Duration::from_secs(60), |r| r.contains_key("durable"))["durable"].clone();
    wait_for("a failed delivery attempt", Duration::from_secs(30), || {
        receiver.requests().iter().any(|r| r.body.windows(7).any(|w| w == b"durable") && r.status == 503).then_some(())
    });
    // The relay can try the webhook before the job's own ack is out (the result and the
    // webhook message are confirmed first, then the job is acked): kill only once it is settled.
    wait_for("the job to be acked", Duration::from_secs(30), || {
        worker.metric("retouch_jobs_in_flight").filter(|n| *n == 0.0)
    });
    worker.kill();
    assert_eq!(broker.ready("jobs"), 0, "the job itself was acked");
    receiver.refusing.store(false, Ordering::SeqCst);
    let mut second = Worker::start(&format!("{name}-2"), &broker.worker_env(5), &s3, &extra);
    second.wait_ready();
    let delivered = wait_for("the delivery after the restart", Duration::from_secs(60), || {
        receiver.requests().into_iter().find(|r| r.status == 204 && r.body.windows(7).any(|w| w == b"durable"))
    });
    assert!(signature_ok(&delivered));
    let body: JobResult = serde_json::from_slice(&delivered.body).expect("json");
    assert_eq!(body, acked);
    assert_eq!(stranger.connections.load(Ordering::SeqCst), 0, "the stranger host was never contacted");
    assert_eq!(second.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_webhook_that_never_succeeds_is_dead_lettered_with_its_last_status() {
    let (_env, name, s3, broker) = setup("webhook-dead");
    let receiver = Receiver::start(usize::MAX);
    let mut env = webhook_env(receiver.port);
    env.push(("RETOUCH_WEBHOOKS_RETRY_FOR", "2s".into()));
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();
    let mut hooked = job("never", "img0.png", 2);
    hooked["webhook"] = json!({"url": format!("http://127.0.0.1:{}/down", receiver.port)});
    broker.publish_json(&hooked);
    let dead = wait_for("the webhook dead letter", Duration::from_secs(60), || {
        let d = broker.drain("webhooks.dead");
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1.get("x-retouch-webhook-last-status").map(String::as_str), Some("503"), "{:?}", dead[0].1);
    assert!(receiver.requests().len() >= 2, "retried before giving up");
    assert_eq!(worker.metric(r#"retouch_webhook_deliveries_total{outcome="gave_up"}"#), Some(1.0));
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}
