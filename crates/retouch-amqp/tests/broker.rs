//! retouch-amqp against a real RabbitMQ (3.10.8 on the reference machine): the shared broker
//! at `RETOUCH_TEST_AMQP_URL` (unique names per test, deleted afterwards) and, for the
//! restart test, a private node started with `RETOUCH_TEST_RABBITMQ_NODE`.
//!
//! Run through `tests/run -p retouch-amqp` (or after `eval "$(tests/run --services-only)"`);
//! a missing variable fails the test instead of skipping it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use retouch_amqp::delivery::{
    HEADER_ATTEMPT, HEADER_DEAD_LETTERED_AT, HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE, HEADER_ERROR_RETRYABLE,
};
use retouch_amqp::topology::check_queue_exists;
use retouch_amqp::{
    Admin, AmqpDelivery, AmqpPublisher, AmqpSettings, AmqpSource, JobPublishOptions, OutgoingJob, TopologyError,
    campaign_queue, declare_topology,
};
use retouch_core::error::{ErrorKind, JobError};
use retouch_core::job::{JobResult, Status};
use retouch_core::queue::{Delivery, DeliveryInfo, JobSource, QueueCounters, QueueError, ResultSink};

// ---------------------------------------------------------------------------------------------
// Helpers

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through `tests/run -p retouch-amqp` (or \
             `eval \"$(tests/run --services-only)\"` first); they need a real RabbitMQ and do not skip"
        )
    })
}

fn suffix() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Settings with names unique to one test.
fn scratch_settings(test: &str) -> AmqpSettings {
    let id = format!("rt-test.{test}.{}", suffix());
    AmqpSettings {
        url: env("RETOUCH_TEST_AMQP_URL"),
        jobs_exchange: format!("{id}.jobs-x"),
        jobs_routing_key: format!("{id}.jobs"),
        jobs_queue: format!("{id}.jobs"),
        results_exchange: format!("{id}.results"),
        dead_letter_exchange: format!("{id}.dlx"),
        dead_letter_queue: format!("{id}.dead"),
        high_priority_queue: format!("{id}.jobs.high"),
        high_priority_routing_key: format!("{id}.jobs.high"),
        cancel_exchange: format!("{id}.cancel"),
        cancel_stream: format!("{id}.cancel"),
        webhook_queue: format!("{id}.webhooks"),
        webhook_dead_queue: format!("{id}.webhooks.dead"),
        connection_name: format!("retouch-amqp-test/{test}"),
        reconnect_backoff_min: Duration::from_millis(200),
        reconnect_backoff_max: Duration::from_secs(2),
        publish_timeout: Duration::from_secs(15),
        ..AmqpSettings::default()
    }
}

/// Deletes a test's queues and exchanges when dropped, even after a failed assertion (on a
/// thread of its own: `Drop` cannot await).
struct Cleanup {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    fn new(s: &AmqpSettings) -> Self {
        Self {
            url: s.url.clone(),
            queues: vec![
                s.jobs_queue.clone(),
                s.dead_letter_queue.clone(),
                s.high_priority_queue.clone(),
                s.cancel_stream.clone(),
                s.webhook_queue.clone(),
                s.webhook_dead_queue.clone(),
            ],
            exchanges: vec![
                s.jobs_exchange.clone(),
                s.results_exchange.clone(),
                s.dead_letter_exchange.clone(),
                s.cancel_exchange.clone(),
            ],
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, queues, exchanges) = (self.url.clone(), self.queues.clone(), self.exchanges.clone());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else { return };
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                    }
                }
                for x in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        });
        let _ = done.join();
    }
}

/// A plain connection for inspecting the broker.
async fn raw(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Ready messages in `queue` (a fresh channel: a failed passive declare closes it).
async fn ready(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    check_queue_exists(&ch, queue).await.expect("queue exists")
}

/// Polls until `queue` holds `n` ready messages.
async fn wait_ready(conn: &Connection, queue: &str, n: u32, within: Duration) {
    let start = Instant::now();
    loop {
        let got = ready(conn, queue).await;
        if got == n {
            return;
        }
        assert!(start.elapsed() < within, "queue {queue}: {got} ready messages, expected {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `basic.get` (auto-ack) until a message arrives.
async fn get_one(ch: &Channel, queue: &str, within: Duration) -> BasicGetMessage {
    let start = Instant::now();
    loop {
        if let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get") {
            return m;
        }
        assert!(start.elapsed() < within, "nothing arrived in {queue} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(source: &mut AmqpSource) -> AmqpDelivery {
    tokio::time::timeout(Duration::from_secs(20), source.next())
        .await
        .expect("a delivery within 20 s")
        .expect("next")
        .expect("not closed")
}

fn header<'a>(m: &'a BasicGetMessage, name: &str) -> Option<&'a AMQPValue> {
    m.properties.headers().as_ref().and_then(|h| h.inner().get(name))
}

fn header_str(m: &BasicGetMessage, name: &str) -> String {
    match header(m, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    }
}

fn job_body(id: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"job_id": id, "source": "s3://inputs/x.png", "instruction": "make it snowy"}),
    )
    .expect("json")
}

fn counters() -> Arc<QueueCounters> {
    Arc::new(QueueCounters::default())
}

async fn setup(test: &str) -> (AmqpSettings, Cleanup, AmqpPublisher, Arc<QueueCounters>) {
    let settings = scratch_settings(test);
    let cleanup = Cleanup::new(&settings);
    let pc = counters();
    let publisher = AmqpPublisher::connect(settings.clone(), pc.clone()).await.expect("publisher");
    (settings, cleanup, publisher, pc)
}

async fn publish(publisher: &AmqpPublisher, id: &str) {
    publisher.publish_job(&job_body(id), id, JobPublishOptions::default()).await.expect("publish job");
}

fn result(job_id: &str, status: Status, campaign: Option<&str>) -> JobResult {
    JobResult {
        campaign_id: campaign.map(Into::into),
        source: Some("s3://inputs/x.png".into()),
        output: Some(format!("s3://outputs/{job_id}.png")),
        width: Some(512),
        height: Some(512),
        seed: Some(7),
        worker: "test".into(),
        model: "tiny".into(),
        ..JobResult::new(job_id, status)
    }
}

/// Proves that every delivery `source` received so far is settled for good — acknowledged,
/// or rejected without requeue — rather than inferring it from a queue that looks empty after
/// a pause: publishes `prefetch` markers and requires them, in order, as the next deliveries,
/// all held at once. A settlement the broker has not processed would still occupy a prefetch
/// slot (the last marker could not arrive), and a requeued job is delivered before newer
/// messages. The markers are then acknowledged.
async fn assert_settled(source: &mut AmqpSource, publisher: &AmqpPublisher, tag: &str) {
    let prefetch = source.settings().prefetch_or(1);
    let ids: Vec<String> = (0..prefetch).map(|i| format!("marker-{tag}-{i}")).collect();
    let markers = ids.iter().map(|id| OutgoingJob {
        body: job_body(id),
        message_id: id.clone(),
        options: JobPublishOptions::default(),
    });
    assert_eq!(publisher.publish_jobs(markers).await.expect("publish markers"), u64::from(prefetch));
    let mut held = Vec::new();
    for id in &ids {
        let d = next(source).await;
        assert_eq!(d.info().message_id.as_deref(), Some(id.as_str()), "a job came back before the markers");
        held.push(d);
    }
    for d in held {
        d.ack().await.expect("ack a marker");
    }
}

// ---------------------------------------------------------------------------------------------
// Topology

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declared_twice_is_fine() {
    let settings = scratch_settings("topology-twice");
    let _cleanup = Cleanup::new(&settings);
    let (conn, ch) = raw(&settings.url).await;
    declare_topology(&ch, &settings).await.expect("first declaration");
    declare_topology(&ch, &settings).await.expect("second declaration");
    // The source and the publisher declare again on connect.
    let source = AmqpSource::connect(settings.clone(), counters()).await.expect("source");
    let publisher = AmqpPublisher::connect(settings.clone(), counters()).await.expect("publisher");
    assert_eq!(ready(&conn, &settings.jobs_queue).await, 0);
    assert_eq!(ready(&conn, &settings.dead_letter_queue).await, 0);
    // With declare_topology off only the jobs queue is checked, passively.
    let passive = AmqpSettings { declare_topology: false, ..settings.clone() };
    declare_topology(&ch, &passive).await.expect("passive check");
    source.shutdown().await;
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_delivery_limit_is_a_clear_error() {
    let settings = scratch_settings("topology-mismatch");
    let _cleanup = Cleanup::new(&settings);
    let (conn, ch) = raw(&settings.url).await;
    declare_topology(&ch, &settings).await.expect("declaration with the default limit");

    let other = AmqpSettings { delivery_limit: 2, ..settings.clone() };
    let ch = conn.create_channel().await.expect("channel");
    let err = declare_topology(&ch, &other).await.expect_err("a different delivery limit must fail");
    let message = err.to_string();
    match &err {
        TopologyError::QueueMismatch { queue, argument, .. } => {
            assert_eq!(queue, &settings.jobs_queue);
            assert_eq!(argument, "x-delivery-limit");
        }
        e => panic!("expected QueueMismatch, got {e:?}"),
    }
    assert!(err.is_permanent());
    assert!(message.contains("delivery_limit = 5") && message.contains("delete queue"), "{message}");

    // The same through the source's constructor, as an operator would see it.
    let err = AmqpSource::connect(other.clone(), counters()).await.expect_err("source must refuse");
    let text = err.to_string();
    assert!(text.contains(&settings.jobs_queue) && text.contains("x-delivery-limit"), "{text}");

    // declare_topology = false on a missing queue: a clear "missing" error.
    let missing =
        AmqpSettings { declare_topology: false, jobs_queue: format!("{}-nope", settings.jobs_queue), ..settings };
    let ch = conn.create_channel().await.expect("channel");
    let err = declare_topology(&ch, &missing).await.expect_err("missing queue");
    assert!(matches!(err, TopologyError::Missing { kind: "queue", .. }), "{err:?}");
    eprintln!("mismatch error: {message}");
}

// ---------------------------------------------------------------------------------------------
// Consuming and settling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_empties_the_queue() {
    let (settings, _cleanup, publisher, _) = setup("ack").await;
    let sc = counters();
    let mut source = AmqpSource::connect(settings.clone(), sc.clone()).await.expect("source");
    assert!(sc.connected.load(Ordering::Relaxed));
    let before = SystemTime::now() - Duration::from_secs(2);
    let opts = JobPublishOptions {
        reply_to: Some("my-replies".into()),
        correlation_id: Some("corr-1".into()),
        ..Default::default()
    };
    publisher.publish_job(&job_body("job-ack"), "job-ack", opts).await.expect("publish");

    let d = next(&mut source).await;
    assert_eq!(d.body(), job_body("job-ack").as_slice());
    let info = d.info().clone();
    assert_eq!(info.message_id.as_deref(), Some("job-ack"));
    assert_eq!(info.reply_to.as_deref(), Some("my-replies"));
    assert_eq!(info.correlation_id.as_deref(), Some("corr-1"));
    assert!(info.published_at.is_some_and(|t| t >= before && t <= SystemTime::now() + Duration::from_secs(2)));
    assert_eq!((info.attempt, info.last_attempt), (1, false));
    d.ack().await.expect("ack");

    // With prefetch 1 the marker only arrives once the broker has processed the ack.
    assert_settled(&mut source, &publisher, "ack").await;
    assert_eq!(sc.lost_acks.load(Ordering::Relaxed), 0);
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_redelivers_with_the_next_attempt() {
    let (settings, _cleanup, publisher, _) = setup("retry").await;
    let mut source = AmqpSource::connect(settings.clone(), counters()).await.expect("source");
    publish(&publisher, "job-retry").await;
    let d = next(&mut source).await;
    assert_eq!(d.info().attempt, 1);
    let t = Instant::now();
    d.retry(Duration::from_millis(300)).await.expect("retry");
    assert!(t.elapsed() >= Duration::from_millis(300), "retry must hold the message for the delay");
    let d = next(&mut source).await;
    assert_eq!(d.info().message_id.as_deref(), Some("job-retry"));
    assert_eq!((d.info().attempt, d.info().last_attempt), (2, false));
    assert!(d.redelivered());
    d.ack().await.expect("ack");
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_limit_marks_the_last_attempt_then_dead_letters() {
    let settings = AmqpSettings { delivery_limit: 2, ..scratch_settings("limit") };
    let _cleanup = Cleanup::new(&settings);
    let publisher = AmqpPublisher::connect(settings.clone(), counters()).await.expect("publisher");
    let mut source = AmqpSource::connect(settings.clone(), counters()).await.expect("source");
    publish(&publisher, "job-limit").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next(&mut source).await;
        seen.push((d.info().attempt, d.info().last_attempt));
        d.retry(Duration::ZERO).await.expect("retry");
    }
    assert_eq!(seen, [(1, false), (2, false), (3, true)]);

    // The fourth return exceeds the limit: the broker dead-letters it through the queue's DLX.
    let (_conn, ch) = raw(&settings.url).await;
    let m = get_one(&ch, &settings.dead_letter_queue, Duration::from_secs(10)).await;
    assert_eq!(m.delivery.data, job_body("job-limit"));
    assert_eq!(header_str(&m, "x-first-death-reason"), "delivery_limit");
    let Some(AMQPValue::FieldArray(deaths)) = header(&m, "x-death") else { panic!("x-death: {:?}", m.properties) };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else { panic!("x-death entry") };
    assert!(matches!(death.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"delivery_limit"));
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_keeps_body_and_properties_and_carries_the_reason() {
    let (settings, _cleanup, publisher, _) = setup("dead-letter").await;
    let sc = counters();
    let mut source = AmqpSource::connect(settings.clone(), sc.clone()).await.expect("source");
    let opts = JobPublishOptions {
        reply_to: Some("replies".into()),
        correlation_id: Some("corr-dl".into()),
        ..Default::default()
    };
    publisher.publish_job(&job_body("job-dl"), "job-dl", opts).await.expect("publish");
    let d = next(&mut source).await;
    d.retry(Duration::ZERO).await.expect("retry");
    let d = next(&mut source).await;
    assert_eq!(d.info().attempt, 2);
    let error = JobError::new(ErrorKind::InvalidImage, "not a decodable image: truncated PNG");
    d.dead_letter(&error).await.expect("dead letter");

    let (_conn, ch) = raw(&settings.url).await;
    let m = get_one(&ch, &settings.dead_letter_queue, Duration::from_secs(10)).await;
    assert_eq!(m.delivery.data, job_body("job-dl"));
    let p = &m.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("job-dl"));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("corr-dl"));
    assert_eq!(p.reply_to().as_ref().map(|s| s.as_str()), Some("replies"));
    assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(header_str(&m, HEADER_ERROR_KIND), "invalid_image");
    assert_eq!(header_str(&m, HEADER_ERROR_MESSAGE), "not a decodable image: truncated PNG");
    assert!(matches!(header(&m, HEADER_ATTEMPT), Some(AMQPValue::LongLongInt(2))), "{:?}", header(&m, HEADER_ATTEMPT));
    assert!(matches!(header(&m, HEADER_ERROR_RETRYABLE), Some(AMQPValue::Boolean(false))));
    let at = header_str(&m, HEADER_DEAD_LETTERED_AT);
    assert!(at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
    // Our explicit dead letter, not the broker's: no x-death, and the broker's delivery count
    // is not carried over (a re-driven job starts afresh).
    assert!(header(&m, "x-death").is_none());
    // (3.10.8 adds `x-delivery-count: 0` to a first basic.get; the original's 1 must be gone.)
    assert!(
        matches!(header(&m, "x-delivery-count"), None | Some(AMQPValue::LongLongInt(0))),
        "{:?}",
        header(&m, "x-delivery-count")
    );

    // The original was acknowledged after the dead letter was confirmed.
    assert_settled(&mut source, &publisher, "dead-letter").await;
    assert_eq!(sc.lost_acks.load(Ordering::Relaxed), 0);
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_dead_letter_falls_back_to_reject() {
    let (settings, _cleanup, publisher, _) = setup("dead-letter-fallback").await;
    let mut source = AmqpSource::connect(settings.clone(), counters()).await.expect("source");
    // No queue behind the dead-letter exchange: the mandatory publish comes back.
    let (conn, ch) = raw(&settings.url).await;
    ch.queue_delete(settings.dead_letter_queue.as_str().into(), QueueDeleteOptions::default()).await.expect("delete");
    publish(&publisher, "job-fallback").await;
    let d = next(&mut source).await;
    let err = d.dead_letter(&JobError::new(ErrorKind::InvalidJob, "bad")).await.expect_err("unconfirmed");
    assert!(matches!(&err, QueueError::Unconfirmed(m) if m.contains("returned") && m.contains("rejected")), "{err}");
    // Rejected without requeue: the markers come next, not the job.
    assert_settled(&mut source, &publisher, "fallback").await;
    assert_eq!(ready(&conn, &settings.jobs_queue).await, 0);
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_redelivers() {
    let (settings, _cleanup, publisher, _) = setup("release").await;
    let mut source = AmqpSource::connect(settings.clone(), counters()).await.expect("source");
    publish(&publisher, "job-release").await;
    let d = next(&mut source).await;
    d.release().await.expect("release");
    let d = next(&mut source).await;
    assert_eq!(d.info().message_id.as_deref(), Some("job-release"));
    assert!(d.redelivered());
    // RabbitMQ ≤ 4.2 counts a nack too (attempt 2); 4.3+ does not (attempt 1).
    assert!((1..=2).contains(&d.info().attempt), "{:?}", d.info());
    eprintln!("attempt after release: {}", d.info().attempt);
    d.ack().await.expect("ack");
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_deliveries_and_in_flight_ones_stay_ackable() {
    let settings = AmqpSettings { prefetch: 2, ..scratch_settings("close") };
    let _cleanup = Cleanup::new(&settings);
    let publisher = AmqpPublisher::connect(settings.clone(), counters()).await.expect("publisher");
    for i in 0..3 {
        publish(&publisher, &format!("job-close-{i}")).await;
    }
    let sc = counters();
    let mut source = AmqpSource::connect(settings.clone(), sc.clone()).await.expect("source");
    let d = next(&mut source).await;
    // Close once the broker has sent the second delivery too (only the third is ready).
    let (conn, _) = raw(&settings.url).await;
    wait_ready(&conn, &settings.jobs_queue, 1, Duration::from_secs(5)).await;
    source.close().await.expect("close");
    assert!(!sc.connected.load(Ordering::Relaxed));
    assert!(source.next().await.expect("next after close").is_none());
    assert!(source.next().await.expect("next after close").is_none());
    d.ack().await.expect("an in-flight delivery stays ackable after close");
    // The other two are ready again (one never delivered, one released by close).
    wait_ready(&conn, &settings.jobs_queue, 2, Duration::from_secs(5)).await;
    source.shutdown().await;
    assert_eq!(ready(&conn, &settings.jobs_queue).await, 2);
}

// ---------------------------------------------------------------------------------------------
// Publishing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_a_bound_queue_and_reply_to() {
    let (settings, cleanup, publisher, pc) = setup("results").await;
    let mut cleanup = cleanup;
    let (_conn, ch) = raw(&settings.url).await;
    let bound = format!("{}.bound", settings.results_exchange);
    let replies = format!("{}.replies", settings.results_exchange);
    cleanup.queues.extend([bound.clone(), replies.clone()]);
    for q in [&bound, &replies] {
        ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("declare");
    }
    ch.queue_bind(
        bound.as_str().into(),
        settings.results_exchange.as_str().into(),
        "succeeded.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");

    let r = result("job-res", Status::Succeeded, Some("spring"));
    let info = DeliveryInfo {
        message_id: Some("job-res".into()),
        reply_to: Some(replies.clone()),
        correlation_id: Some("corr-res".into()),
        attempt: 1,
        ..DeliveryInfo::default()
    };
    publisher.publish(&r, &info, None).await.expect("publish result");

    let m = get_one(&ch, &bound, Duration::from_secs(5)).await;
    assert_eq!(m.delivery.routing_key.as_str(), "succeeded.spring");
    assert_eq!(m.delivery.exchange.as_str(), settings.results_exchange);
    assert_eq!(m.properties.message_id().as_ref().map(|s| s.as_str()), Some("job-res"));
    assert_eq!(m.properties.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(*m.properties.delivery_mode(), Some(2));
    let back: JobResult = serde_json::from_slice(&m.delivery.data).expect("result json");
    assert_eq!(back, r);

    let m = get_one(&ch, &replies, Duration::from_secs(5)).await;
    assert_eq!(m.delivery.routing_key.as_str(), replies);
    assert_eq!(m.properties.correlation_id().as_ref().map(|s| s.as_str()), Some("corr-res"));
    assert_eq!(m.properties.message_id().as_ref().map(|s| s.as_str()), Some("job-res"));
    assert_eq!(pc.unroutable_results.load(Ordering::Relaxed), 0);

    // A failed result does not match "succeeded.*": unroutable, counted, not an error.
    publisher.publish(&result("job-res-2", Status::Failed, None), &DeliveryInfo::default(), None).await.expect("Ok");
    assert_eq!(pc.unroutable_results.load(Ordering::Relaxed), 1);
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_result_is_counted_not_fatal() {
    let (_settings, _cleanup, publisher, pc) = setup("unroutable-result").await;
    let r = result("job-u", Status::Succeeded, None);
    publisher.publish(&r, &DeliveryInfo::default(), None).await.expect("unroutable result is Ok");
    assert_eq!(pc.unroutable_results.load(Ordering::Relaxed), 1);
    // A reply_to queue that does not exist: counted as well.
    let info =
        DeliveryInfo { reply_to: Some(format!("rt-test.no-such-queue.{}", suffix())), ..DeliveryInfo::default() };
    publisher.publish(&r, &info, None).await.expect("Ok");
    assert_eq!(pc.unroutable_results.load(Ordering::Relaxed), 3);
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_job_is_an_error() {
    let (settings, _cleanup, publisher, _) = setup("unroutable-job").await;
    let (conn, ch) = raw(&settings.url).await;
    ch.queue_delete(settings.jobs_queue.as_str().into(), QueueDeleteOptions::default()).await.expect("delete");
    let err = publisher.publish_job(b"{}", "job-lost", JobPublishOptions::default()).await.expect_err("unroutable job");
    assert!(matches!(&err, QueueError::Unconfirmed(m) if m.contains("unroutable") && m.contains("job-lost")), "{err}");
    // The channel survives: a routable publish afterwards works (after redeclaring).
    let ch = conn.create_channel().await.expect("channel");
    declare_topology(&ch, &settings).await.expect("redeclare");
    publish(&publisher, "job-ok").await;
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_queue_collects_its_campaign_results_for_the_results_consumer() {
    let (settings, mut cleanup, publisher, pc) = setup("campaign").await;
    let admin = Admin::connect(settings.clone()).await.expect("admin");
    let queue = admin.declare_campaign_queue("spring").await.expect("declare");
    cleanup.queues.push(queue.clone());
    assert_eq!(queue, campaign_queue(&settings, "spring"));
    assert_eq!(admin.declare_campaign_queue("spring").await.expect("declared again"), queue, "idempotent");
    for (id, status, campaign) in [
        ("a", Status::Succeeded, Some("spring")),
        ("other-campaign", Status::Succeeded, Some("summer")),
        ("no-campaign", Status::Failed, None),
        ("b", Status::Failed, Some("spring")),
    ] {
        publisher.publish(&result(id, status, campaign), &DeliveryInfo::default(), None).await.expect("publish");
    }
    assert_eq!(pc.unroutable_results.load(Ordering::Relaxed), 2, "only the campaign's results are routed to it");
    assert_eq!(admin.ready(&queue).await.expect("ready"), 2);

    // Prefetch 1: the second result only comes once the first is acknowledged.
    let mut results = admin.consume_results(&queue, 1).await.expect("consume");
    for expected in ["a", "b"] {
        let message = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("a result within 10 s")
            .expect("next")
            .expect("subscribed");
        let r: JobResult = serde_json::from_slice(message.body()).expect("result json");
        assert_eq!(r.job_id, expected);
        message.ack().await.expect("ack");
    }
    // Deleting the queue ends the subscription.
    admin.delete_queue(&queue).await.expect("delete");
    let end = tokio::time::timeout(Duration::from_secs(10), results.next()).await.expect("the consumer ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    results.cancel().await.expect("cancel after the broker's cancel");

    // Cancelled in order, the subscription leaves the connection usable (the queue can go).
    let queue = admin.declare_campaign_queue("autumn").await.expect("declare");
    cleanup.queues.push(queue.clone());
    let results = admin.consume_results(&queue, 1).await.expect("consume");
    results.cancel().await.expect("cancel");
    admin.delete_queue(&queue).await.expect("delete after the cancel");
    admin.close().await;
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_publish_throughput() {
    const N: u64 = 20_000;
    let (settings, _cleanup, publisher, _) = setup("bulk").await;
    let jobs: Vec<OutgoingJob> = (0..N)
        .map(|i| {
            let id = format!("bulk-{i:06}");
            OutgoingJob { body: job_body(&id), message_id: id, options: JobPublishOptions::default() }
        })
        .collect();
    let bytes = jobs[0].body.len();
    let t = Instant::now();
    let confirmed = publisher.publish_jobs(jobs).await.expect("bulk publish");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(confirmed, N);
    let (conn, _) = raw(&settings.url).await;
    wait_ready(&conn, &settings.jobs_queue, N as u32, Duration::from_secs(10)).await;
    eprintln!(
        "publish_jobs: {N} jobs of {bytes} B in {secs:.2} s = {:.0} jobs/s (confirmed, persistent, quorum queue)",
        N as f64 / secs
    );
    publisher.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Broker restart (private node)

/// A private RabbitMQ node, stopped (and its data removed) when dropped.
struct Node {
    script: String,
    dir: PathBuf,
    port: u16,
}

impl Node {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(&self.script)
            .arg(args[0])
            .arg(&self.dir)
            .arg(self.port.to_string())
            .args(&args[1..])
            .output()
            .expect("run the rabbitmq node script");
        assert!(
            out.status.success(),
            "{} {args:?}: {}\n{}",
            self.script,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn run_async(self: &Arc<Self>, args: &'static [&'static str]) {
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            node.run(args);
        })
        .await
        .expect("node script");
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("stop").arg(&self.dir).arg(self.port.to_string()).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn definitions_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/rabbitmq/definitions.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_broker_restart() {
    let script = env("RETOUCH_TEST_RABBITMQ_NODE");
    // The restart test runs first on the node, so the whole topology comes from
    // config/rabbitmq/definitions.json: the source checks it passively, the publisher then
    // declares the defaults on top, which fails unless the two agree.
    let node = Arc::new(Node {
        script,
        dir: std::env::temp_dir().join(format!("retouch-amqp-node-{}", suffix())),
        port: free_port(),
    });
    let t0 = Instant::now();
    node.run_async(&["start"]).await;
    let definitions = definitions_path();
    let defs = definitions.to_str().expect("utf-8 path").to_owned();
    {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.run(&["ctl", "import_definitions", &defs])).await.expect("import");
    }
    eprintln!("private node up with definitions in {:.1} s", t0.elapsed().as_secs_f64());

    let settings = AmqpSettings {
        url: node.url(),
        declare_topology: false,
        prefetch: 4,
        reconnect_backoff_min: Duration::from_millis(200),
        reconnect_backoff_max: Duration::from_secs(2),
        publish_timeout: Duration::from_secs(60),
        connection_name: "retouch-amqp-test/restart".into(),
        ..AmqpSettings::default()
    };
    let sc = counters();
    let mut source =
        AmqpSource::connect(settings.clone(), sc.clone()).await.expect("source on the provisioned topology");
    let pc = counters();
    let publisher = AmqpPublisher::connect(AmqpSettings { declare_topology: true, ..settings.clone() }, pc.clone())
        .await
        .expect("declaring the defaults over definitions.json must be a no-op");

    let job = |i: usize| {
        let id = format!("restart-{i:02}");
        OutgoingJob { body: job_body(&id), message_id: id, options: JobPublishOptions::default() }
    };
    assert_eq!(publisher.publish_jobs((0..20).map(job)).await.expect("publish"), 20);

    let mut acked = BTreeSet::new();
    for _ in 0..3 {
        let d = next(&mut source).await;
        acked.insert(d.info().message_id.clone().expect("id"));
        d.ack().await.expect("ack");
    }
    let old = next(&mut source).await;
    let old_id = old.info().message_id.clone().expect("id");
    assert!(sc.connected.load(Ordering::Relaxed));

    let t = Instant::now();
    node.run_async(&["restart"]).await;
    eprintln!("restart took {:.1} s", t.elapsed().as_secs_f64());
    assert!(!sc.connected.load(Ordering::Relaxed), "the watcher marks the loss without polling");

    // A delivery from the dead connection cannot be settled; the broker gives it back.
    assert!(!old.is_settleable());
    let err = old.ack().await.expect_err("ack on the old connection");
    assert!(matches!(err, QueueError::Lost(_)), "{err}");
    assert_eq!(sc.lost_acks.load(Ordering::Relaxed), 1);

    // Keep publishing (the publisher reconnects lazily) and consuming (the source reconnects).
    assert_eq!(publisher.publish_jobs((20..30).map(job)).await.expect("publish after restart"), 10);
    let deadline = Instant::now() + Duration::from_secs(90);
    while acked.len() < 30 {
        assert!(Instant::now() < deadline, "only {} of 30 jobs acked: {acked:?}", acked.len());
        let d = next(&mut source).await;
        let id = d.info().message_id.clone().expect("id");
        match d.ack().await {
            Ok(()) => {
                acked.insert(id);
            }
            Err(e) => eprintln!("ack of {id} lost ({e}); it will come back"),
        }
    }
    assert!(acked.contains(&old_id), "the job held across the restart came back");
    assert!(sc.reconnects.load(Ordering::Relaxed) >= 1, "source reconnects");
    assert!(pc.reconnects.load(Ordering::Relaxed) >= 1, "publisher reconnects");
    assert!(sc.connected.load(Ordering::Relaxed));
    eprintln!(
        "restart test: source reconnects {}, publisher reconnects {}, lost acks {}, total {:.1} s",
        sc.reconnects.load(Ordering::Relaxed),
        pc.reconnects.load(Ordering::Relaxed),
        sc.lost_acks.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    // Every job acked for good, no duplicate left behind: the markers are all that is left.
    assert_settled(&mut source, &publisher, "restart").await;
    source.shutdown().await;
    publisher.shutdown().await;
}
