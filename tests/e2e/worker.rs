//! `retouch worker` end to end: a real RabbitMQ, a real SigV4-checking S3 server (s3s-fs),
//! the committed tiny checkpoint, the worker as a separate process.

use std::collections::BTreeMap;
use std::time::Duration;

use retouch_core::error::ErrorKind;
use retouch_core::imaging::png_claiming;
use retouch_core::job::{JobResult, Status};
use retouch_e2e::{Broker, Env, PrivateBroker, S3Server, Worker, temp_dir, test_png, unique, wait_for};
use serde_json::json;

fn setup(test: &str, delivery_limit: u32, inputs: usize) -> (Env, String, S3Server, Broker) {
    let env = Env::get();
    let name = unique(test);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..inputs {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 17));
    }
    let broker = Broker::new(&env.amqp_url, &name, delivery_limit);
    (env, name, s3, broker)
}

fn job(id: &str, source: usize, steps: u32) -> serde_json::Value {
    json!({"job_id": id, "source": format!("s3://inputs/img{source}.png"), "instruction": "make it snowy",
           "params": {"steps": steps}})
}

fn count(n: usize) -> impl Fn(&BTreeMap<String, JobResult>) -> bool {
    move |r| r.len() >= n
}

/// The output object of a succeeded result, decoded.
fn output_image(s3: &S3Server, result: &JobResult) -> image::RgbImage {
    let url = result.output.as_deref().expect("output");
    let (bucket, key) = url.trim_start_matches("s3://").split_once('/').expect("s3 url");
    let bytes = s3.get(bucket, key).unwrap_or_else(|| panic!("{url} is missing"));
    image::load_from_memory(&bytes).expect("the output decodes").to_rgb8()
}

/// Waits until the worker has handed a batch to the model.
fn wait_for_inference(worker: &Worker) {
    wait_for("a batch to reach the model", Duration::from_secs(30), || {
        worker.metric("retouch_batch_size_count").filter(|n| *n > 0.0)
    });
}

#[test]
fn jobs_become_outputs_and_results_and_metrics_pass_promtool() {
    let (env, name, s3, mut broker) = setup("happy", 5, 5);
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[("RETOUCH_ENGINE_MAX_BATCH", "4")]);
    worker.wait_ready();
    for i in 0..5 {
        broker.publish_json(&job(&format!("happy-{i}"), i, 4));
    }
    let results = broker.results_until(Duration::from_secs(120), count(5));
    for (id, r) in &results {
        assert_eq!(r.status, Status::Succeeded, "{id}: {r:?}");
        assert_eq!(r.output.as_deref(), Some(format!("s3://outputs/{name}/{id}.png").as_str()));
        let out = output_image(&s3, r);
        assert_eq!((out.width(), out.height(), r.width, r.height), (64, 64, Some(64), Some(64)));
        assert!(r.timings.queue_wait.is_some() && r.timings.inference > 0.0, "{:?}", r.timings);
    }
    let (status, metrics) = worker.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains(r#"retouch_jobs_total{error_kind="none",outcome="succeeded"} 5"#), "{metrics}");
    let dir = temp_dir(&name);
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &metrics).expect("write metrics");
    let lint = std::process::Command::new(&env.promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("metrics file"))
        .output()
        .expect("promtool");
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_job_alone_and_inside_a_batch_give_identical_bytes() {
    let (_env, name, s3, mut broker) = setup("identical", 5, 3);
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "3"), ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "3s")];
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();
    let with_seed = |id: &str, source: usize| {
        json!({"job_id": id, "source": format!("s3://inputs/img{source}.png"), "instruction": "turn it into a painting",
               "params": {"steps": 6, "seed": 1234}})
    };
    broker.publish_json(&with_seed("alone", 0));
    let alone = broker.results_until(Duration::from_secs(60), count(1));
    for (id, source) in [("batched", 0), ("companion-1", 1), ("companion-2", 2)] {
        broker.publish_json(&with_seed(id, source));
    }
    let batched = broker.results_until(Duration::from_secs(60), count(3));
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    assert!(metrics.contains("retouch_batch_size_sum 4"), "one call of 1 and one of 3:\n{metrics}");
    let key = |r: &JobResult| r.output.clone().expect("output");
    let a = s3.get("outputs", key(&alone["alone"]).trim_start_matches("s3://outputs/")).expect("alone output");
    let b = s3.get("outputs", key(&batched["batched"]).trim_start_matches("s3://outputs/")).expect("batched output");
    assert!(a == b, "the same job gave different bytes alone and in a batch");
}

#[test]
fn kill_9_in_the_middle_of_a_batch_then_restart_loses_nothing() {
    let (_env, name, s3, mut broker) = setup("kill", 5, 6);
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "3")];
    let mut first = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    first.wait_ready();
    for i in 0..6 {
        broker.publish_json(&job(&format!("kill-{i}"), i, 20));
    }
    // Killed once the model is denoising (a step has completed), not before.
    wait_for("a denoising step", Duration::from_secs(30), || {
        first.metric("retouch_denoise_step_duration_seconds_count").filter(|n| *n > 0.0)
    });
    first.kill();
    let mut second = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    second.wait_ready();
    let results = broker.results_until(Duration::from_secs(180), count(6));
    for r in results.values() {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(output_image(&s3, r).dimensions(), (64, 64));
    }
    assert!(results.values().any(|r| r.attempt >= 2), "the killed worker's jobs came back: {results:?}");
    assert_eq!(broker.ready("dead"), 0, "nothing dead-lettered");
    assert_eq!(second.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn sigterm_in_the_middle_of_a_batch_exits_0_and_loses_nothing() {
    let (_env, name, s3, mut broker) = setup("term", 5, 6);
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "3")];
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();
    for i in 0..6 {
        broker.publish_json(&job(&format!("term-{i}"), i, 20));
    }
    wait_for_inference(&worker);
    let status = worker.terminate(Duration::from_secs(90));
    assert_eq!(status.code(), Some(0), "logs:\n{}", worker.logs());
    // Everything is either finished (a result) or back in the queue.
    let mut finished = BTreeMap::new();
    let waiting = wait_for("finished + returned = 6", Duration::from_secs(15), || {
        finished.extend(broker.drain_results());
        let waiting = broker.ready("jobs") as usize;
        (finished.len() + waiting == 6).then_some(waiting)
    });
    assert!(!finished.is_empty(), "the running batch finished before the exit");
    assert!(finished.values().all(|r| r.status == Status::Succeeded));
    let mut next = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    next.wait_ready();
    let rest = broker.results_until(Duration::from_secs(180), count(waiting));
    let all: BTreeMap<_, _> = finished.into_iter().chain(rest).collect();
    assert_eq!(all.len(), 6, "every job ends succeeded: {all:?}");
    assert!(all.values().all(|r| r.status == Status::Succeeded));
    assert_eq!(broker.ready("dead"), 0);
}

#[test]
fn a_broker_restart_mid_run_is_survived() {
    let env = Env::get();
    let name = unique("restart");
    let node = PrivateBroker::start(&env, &name);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..6 {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 17));
    }
    let mut broker = Broker::new(&node.url(), &name, 5);
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[("RETOUCH_ENGINE_MAX_BATCH", "2")]);
    worker.wait_ready();
    for i in 0..6 {
        broker.publish_json(&job(&format!("restart-{i}"), i, 10));
    }
    let early = broker.results_until(Duration::from_secs(60), count(1));
    node.restart();
    broker.reconnect();
    let rest = broker.results_until(Duration::from_secs(240), |r| {
        early.keys().chain(r.keys()).collect::<std::collections::BTreeSet<_>>().len() >= 6
    });
    let all: BTreeMap<_, _> = early.into_iter().chain(rest).collect();
    assert_eq!(all.len(), 6, "{all:?}\n{}", worker.logs());
    assert!(all.values().all(|r| r.status == Status::Succeeded), "{all:?}");
    wait_for("/readyz to be 200 again after the reconnect", Duration::from_secs(60), || {
        worker.get("/readyz").filter(|(status, _)| *status == 200)
    });
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    let reconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("retouch_amqp_reconnects_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("reconnect counter");
    assert!(reconnects >= 1, "{metrics}");
}

#[test]
fn a_storage_outage_is_retried_then_the_job_succeeds() {
    let (_env, name, mut s3, mut broker) = setup("outage", 5, 1);
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[]);
    worker.wait_ready();
    s3.stop();
    broker.publish_json(&job("outage-1", 0, 4));
    // S3 comes back once the outage has cost the job an attempt.
    wait_for("a storage failure to be retried", Duration::from_secs(60), || {
        worker.metric(r#"retouch_jobs_total{error_kind="storage",outcome="retried"}"#).filter(|n| *n >= 1.0)
    });
    s3.resume();
    let results = broker.results_until(Duration::from_secs(90), count(1));
    let r = &results["outage-1"];
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert!(r.attempt >= 2, "retried: attempt {}", r.attempt);
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    assert!(metrics.contains(r#"retouch_jobs_total{error_kind="storage",outcome="retried"}"#), "{metrics}");
}

#[test]
fn storage_down_for_good_ends_in_a_failure_result_and_a_dead_letter() {
    let (_env, name, mut s3, mut broker) = setup("down", 2, 1);
    let mut worker = Worker::start(&name, &broker.worker_env(2), &s3, &[]);
    worker.wait_ready();
    s3.stop();
    broker.publish_json(&job("down-1", 0, 4));
    let results = broker.results_until(Duration::from_secs(120), count(1));
    let r = &results["down-1"];
    let error = r.error.clone().expect("error");
    assert_eq!((r.status, error.kind, r.attempt), (Status::Failed, ErrorKind::Storage, 3), "{r:?}");
    let dead = broker.dead_letters_until(1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["x-retouch-error-kind"], "storage");
    assert!(String::from_utf8_lossy(&dead[0].0).contains("down-1"), "the body is kept");
    assert!(worker.try_status().is_none(), "the worker keeps running");
}

#[test]
fn bad_jobs_fail_with_their_kind_are_dead_lettered_and_the_worker_keeps_going() {
    let (_env, name, s3, mut broker) = setup("bad", 5, 1);
    s3.put("inputs", "notes.png", b"hello, I am not an image");
    let mut truncated = test_png(3);
    truncated.truncate(truncated.len() / 2);
    s3.put("inputs", "truncated.png", &truncated);
    s3.put("inputs", "huge.png", &png_claiming(100_000, 100_000));
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[]);
    worker.wait_ready();
    let source = |key: &str| format!("s3://inputs/{key}");
    broker.publish(b"this is not json", "bad-not-json");
    broker.publish(br#"{"job_id":"bad-missing-fields"}"#, "bad-missing-fields");
    let cases = [
        (
            "bad-unknown-key",
            json!({"job_id": "bad-unknown-key", "source": source("img0.png"), "instruction": "x", "colour": "red"}),
            ErrorKind::InvalidJob,
        ),
        (
            "bad-scheduler",
            json!({"job_id": "bad-scheduler", "source": source("img0.png"), "instruction": "x", "params": {"scheduler": "pndm"}}),
            ErrorKind::InvalidJob,
        ),
        (
            "bad-missing-source",
            json!({"job_id": "bad-missing-source", "source": source("nope.png"), "instruction": "x"}),
            ErrorKind::SourceNotFound,
        ),
        (
            "bad-not-image",
            json!({"job_id": "bad-not-image", "source": source("notes.png"), "instruction": "x"}),
            ErrorKind::InvalidImage,
        ),
        (
            "bad-truncated",
            json!({"job_id": "bad-truncated", "source": source("truncated.png"), "instruction": "x"}),
            ErrorKind::InvalidImage,
        ),
        (
            "bad-huge",
            json!({"job_id": "bad-huge", "source": source("huge.png"), "instruction": "x"}),
            ErrorKind::ImageTooLarge,
        ),
    ];
    for (_, body, _) in &cases {
        broker.publish_json(body);
    }
    broker.publish_json(&job("good-after-bad", 0, 4));
    let results = broker.results_until(Duration::from_secs(90), count(9));
    let kind = |id: &str| results[id].error.as_ref().map(|e| e.kind);
    assert_eq!(kind("bad-not-json"), Some(ErrorKind::InvalidJob));
    assert_eq!(kind("bad-missing-fields"), Some(ErrorKind::InvalidJob));
    for (id, _, expected) in &cases {
        assert_eq!(kind(id), Some(*expected), "{id}: {:?}", results[*id]);
    }
    assert!(results["bad-unknown-key"].error.as_ref().expect("error").message.contains("colour"));
    assert_eq!(results["good-after-bad"].status, Status::Succeeded);
    let dead = broker.dead_letters_until(8, Duration::from_secs(10));
    assert_eq!(dead.len(), 8);
    assert!(
        dead.iter().all(|(_, h)| h.contains_key("x-retouch-error-kind") && h.contains_key("x-retouch-error-message"))
    );
    assert!(worker.try_status().is_none(), "the worker survived every bad job");
}

#[test]
fn wrong_s3_credentials_stop_the_worker_with_a_clear_error() {
    let (_env, name, s3, broker) = setup("creds", 5, 0);
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]);
    let status = worker.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
    let logs = worker.logs();
    assert!(logs.contains("check the S3 credentials"), "{logs}");
}
