//! S3 faults on the wire: the real worker talks to the real s3s-fs server through a
//! [`FaultProxy`] that answers 503 SlowDown / 500, delays, resets connections in the middle of a
//! body (GET and PUT) and truncates bodies under a correct `Content-Length`. What must hold:
//! transient faults are retried (the proxy saw the retries; the result's `attempt` and
//! `timings` show them), no corrupt or partial output is ever written (every output equals, byte
//! for byte, the output of a fault-free twin job: same source bytes, seed and parameters), and a
//! fault that outlasts every retry ends in a `storage` failure and a dead letter, never in a
//! success with a broken output.
//!
//! Each job is its own case: its source is `inputs/<case>.png` (the same bytes for every case),
//! its output `outputs/<test>/<case>.png`, and the proxy's rules match those keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use retouch_core::error::ErrorKind;
use retouch_core::job::{JobResult, Status};
use retouch_e2e::{Broker, Env, Exchange, Fault, FaultProxy, Rule, S3Server, Worker, test_png, unique};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The fault-free twin of every case.
const CLEAN: &str = "clean";

/// A test's services: S3 behind the proxy, the broker objects, the worker's output prefix.
struct Setup {
    name: String,
    s3: S3Server,
    proxy: FaultProxy,
    broker: Broker,
}

impl Setup {
    /// S3 with one identical source per case (and [`CLEAN`]), the proxy in front of it, and
    /// the broker objects.
    fn new(test: &str, delivery_limit: u32, cases: &[&str]) -> Self {
        let env = Env::get();
        let name = unique(test);
        let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
        let source = test_png(7);
        for case in cases.iter().chain([&CLEAN]) {
            s3.put("inputs", &format!("{case}.png"), &source);
        }
        let proxy = FaultProxy::start(&s3);
        let broker = Broker::new(&env.amqp_url, &name, delivery_limit);
        Self { name, s3, proxy, broker }
    }

    /// A worker whose S3 endpoint is the proxy, with `extra` variables.
    fn worker(&self, delivery_limit: u32, extra: &[(&str, &str)]) -> Worker {
        let endpoint = self.proxy.endpoint();
        let env = [&[("RETOUCH_S3_ENDPOINT", endpoint.as_str())], extra].concat();
        let mut worker = Worker::start(&self.name, &self.broker.worker_env(delivery_limit), &self.s3, &env);
        worker.wait_ready();
        worker
    }

    /// Publishes one job per case, [`CLEAN`] first, and waits for a result of each.
    fn run(&mut self, cases: &[&str], timeout: Duration) -> BTreeMap<String, JobResult> {
        let all: Vec<&str> = [CLEAN].into_iter().chain(cases.iter().copied()).collect();
        for case in &all {
            self.broker.publish_json(&json!({
                "job_id": case, "source": format!("s3://inputs/{case}.png"), "instruction": "make it snowy",
                "params": {"steps": 4, "seed": 4242}}));
        }
        self.broker.results_until(timeout, |r| all.iter().all(|c| r.contains_key(*c)))
    }

    /// The output key of a case, as the proxy sees it in a request target.
    fn output_key(&self, case: &str) -> String {
        format!("outputs/{}/{case}.png", self.name)
    }

    /// The stored output of a case.
    fn output(&self, case: &str) -> Option<Vec<u8>> {
        self.s3.get("outputs", &format!("{}/{case}.png", self.name))
    }

    /// Checks that `case` succeeded and that its output equals the clean twin's, byte for byte.
    fn assert_output_is_clean(&self, results: &BTreeMap<String, JobResult>, case: &str) {
        let r = &results[case];
        assert_eq!(r.status, Status::Succeeded, "{case}: {r:?}");
        assert_eq!(r.output.as_deref(), Some(format!("s3://outputs/{}/{case}.png", self.name).as_str()));
        let clean = self.output(CLEAN).expect("the clean twin's output");
        let got = self.output(case).unwrap_or_else(|| panic!("{case}: the output is missing"));
        assert!(
            got == clean,
            "{case}: the output differs from the fault-free run's: {} bytes sha256 {} vs {} bytes sha256 {}",
            got.len(),
            sha256(&got),
            clean.len(),
            sha256(&clean)
        );
        image::load_from_memory(&got).unwrap_or_else(|e| panic!("{case}: the output does not decode: {e}"));
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What the proxy did to each request, as `(fault, status)`, for the messages.
fn outline(seen: &[Exchange]) -> Vec<(Option<Fault>, Option<u16>)> {
    seen.iter().map(|e| (e.fault.clone(), e.status)).collect()
}

#[test]
fn transient_5xx_on_get_and_put_are_retried_and_outputs_match_a_clean_run() {
    let cases = ["get-503", "get-500", "put-503", "put-500"];
    let mut t = Setup::new("s3-5xx", 5, &cases);
    let slow_down = Fault::Status(503, "SlowDown");
    let internal = Fault::Status(500, "InternalError");
    t.proxy.add(Rule::first(1, "GET", "inputs/get-503.png", slow_down.clone()));
    t.proxy.add(Rule::first(1, "GET", "inputs/get-500.png", internal.clone()));
    t.proxy.add(Rule::first(1, "PUT", &t.output_key("put-503"), slow_down.clone()));
    t.proxy.add(Rule::first(1, "PUT", &t.output_key("put-500"), internal.clone()));
    let _worker = t.worker(5, &[]);
    let results = t.run(&cases, Duration::from_secs(90));

    for case in cases {
        t.assert_output_is_clean(&results, case);
        // One 5xx is absorbed by the SDK's retry inside the same delivery.
        assert_eq!(results[case].attempt, 1, "{case}: {:?}", results[case]);
    }
    for (method, key, fault) in [
        ("GET", "inputs/get-503.png".to_string(), &slow_down),
        ("GET", "inputs/get-500.png".to_string(), &internal),
        ("PUT", t.output_key("put-503"), &slow_down),
        ("PUT", t.output_key("put-500"), &internal),
    ] {
        let seen = t.proxy.seen_for(method, &key);
        let Fault::Status(code, _) = fault else { unreachable!("5xx faults only") };
        assert_eq!(
            outline(&seen),
            [(Some(fault.clone()), Some(*code)), (None, Some(200))],
            "{method} {key}: answered {code} by the proxy, then retried and forwarded"
        );
    }
    // Keep-alive connections carried several requests through the proxy (and its faults).
    let seen = t.proxy.seen();
    let most = seen.iter().map(|e| seen.iter().filter(|o| o.connection == e.connection).count()).max();
    assert!(most >= Some(2), "no connection was reused: {seen:?}");
    // A retried PUT sends the whole body again, with a Content-Length (no chunked encoding).
    let clean_len = t.output(CLEAN).expect("clean output").len();
    for case in ["put-503", "put-500"] {
        let puts = t.proxy.seen_for("PUT", &t.output_key(case));
        assert!(
            puts.iter().all(|p| p.request_body == clean_len && !p.chunked),
            "{case}: every attempt carries the {clean_len}-byte body: {puts:?}"
        );
    }
}

#[test]
fn a_get_reset_or_truncated_mid_body_is_retried_and_never_decoded() {
    let cases = ["get-reset", "get-truncated"];
    let mut t = Setup::new("s3-get-cut", 5, &cases);
    t.proxy.add(Rule::first(1, "GET", "inputs/get-reset.png", Fault::ResetMidBody));
    t.proxy.add(Rule::first(1, "GET", "inputs/get-truncated.png", Fault::TruncateBody));
    let _worker = t.worker(5, &[]);
    let results = t.run(&cases, Duration::from_secs(90));

    let source_len = t.s3.get("inputs", "clean.png").expect("source").len() as u64;
    for (case, fault) in [("get-reset", Fault::ResetMidBody), ("get-truncated", Fault::TruncateBody)] {
        let r = &results[case];
        assert!(
            r.status == Status::Succeeded,
            "{case}: a source body cut under a correct Content-Length must be retried, not decoded: {r:?}"
        );
        t.assert_output_is_clean(&results, case);
        let gets = t.proxy.seen_for("GET", &format!("inputs/{case}.png"));
        assert_eq!(
            outline(&gets),
            [(Some(fault.clone()), Some(200)), (None, Some(200))],
            "{case}: the cut GET (status 200, Content-Length {source_len}, half the bytes) was retried once"
        );
        assert!(gets.iter().all(|g| g.content_length == Some(source_len)), "{gets:?}");
        // The body fails after the SDK's call has returned: the job's own retry fetches again.
        assert_eq!(r.attempt, 2, "{case}: retried by a second delivery: {r:?}");
    }
    assert_eq!(results[CLEAN].attempt, 1);
}

#[test]
fn a_put_reset_mid_body_never_leaves_a_partial_output() {
    let cases = ["put-reset", "put-truncated"];
    let mut t = Setup::new("s3-put-cut", 5, &cases);
    // Both SDK attempts of the first delivery are cut: the job's own retry writes the output.
    t.proxy.add(Rule::first(2, "PUT", &t.output_key("put-reset"), Fault::ResetMidBody));
    t.proxy.add(Rule::first(2, "PUT", &t.output_key("put-truncated"), Fault::TruncateBody));

    // Every size the output files have on the server's disk while the jobs run.
    let stop = Arc::new(AtomicBool::new(false));
    let files: Vec<_> =
        cases.iter().map(|c| t.s3.root.join("outputs").join(&t.name).join(format!("{c}.png"))).collect();
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sizes: Vec<std::collections::BTreeSet<u64>> = vec![Default::default(); files.len()];
            loop {
                // One last look after the stop: the outputs exist by then.
                let last = stop.load(Ordering::Relaxed);
                for (file, sizes) in files.iter().zip(&mut sizes) {
                    if let Ok(meta) = std::fs::metadata(file) {
                        sizes.insert(meta.len());
                    }
                }
                if last {
                    return sizes;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let _worker = t.worker(5, &[]);
    let results = t.run(&cases, Duration::from_secs(90));
    stop.store(true, Ordering::Relaxed);
    let sizes = watcher.join().expect("watcher");

    let clean_len = t.output(CLEAN).expect("clean output").len() as u64;
    for ((case, fault), sizes) in
        [("put-reset", Fault::ResetMidBody), ("put-truncated", Fault::TruncateBody)].into_iter().zip(sizes)
    {
        t.assert_output_is_clean(&results, case);
        let key = t.output_key(case);
        let puts = t.proxy.seen_for("PUT", &key);
        assert_eq!(
            outline(&puts),
            [(Some(fault.clone()), None), (Some(fault.clone()), None), (None, Some(200))],
            "{case}: two cut PUTs (no answer), then one that went through"
        );
        assert!(results[case].attempt >= 2, "{case}: the first delivery failed: {:?}", results[case]);
        // The next delivery's duplicate check looked at the output key: nothing was there.
        let heads = t.proxy.seen_for("HEAD", &key);
        assert!(heads.len() >= 2, "{case}: a HEAD per delivery: {heads:?}");
        for head in &heads {
            assert!(
                head.status == Some(404) || (head.status == Some(200) && head.content_length == Some(clean_len)),
                "{case}: a partial object was visible at the output key: {head:?}"
            );
        }
        assert!(
            sizes.iter().eq([&clean_len]),
            "{case}: the output file had sizes {sizes:?} on the server's disk; only {clean_len} is complete"
        );
    }
}

#[test]
fn a_latency_spike_times_out_the_attempt_and_shows_in_the_fetch_timing() {
    let cases = ["slow"];
    let mut t = Setup::new("s3-slow", 5, &cases);
    t.proxy.add(Rule::first(1, "GET", "inputs/slow.png", Fault::Delay(Duration::from_secs(2))));
    let _worker = t.worker(5, &[("RETOUCH_S3_ATTEMPT_TIMEOUT", "1s")]);
    let results = t.run(&cases, Duration::from_secs(90));

    t.assert_output_is_clean(&results, "slow");
    let r = &results["slow"];
    assert_eq!(r.attempt, 1, "the SDK retried the timed-out attempt within the delivery: {r:?}");
    assert!(r.timings.fetch >= 1.0, "the fetch took the 1 s attempt timeout and the retry: {:?}", r.timings);
    let gets = t.proxy.seen_for("GET", "inputs/slow.png");
    assert_eq!(gets.len(), 2, "the delayed GET, then its retry: {gets:?}");
    assert_eq!(gets[0].fault, Some(Fault::Delay(Duration::from_secs(2))));
    assert_eq!((gets[1].fault.clone(), gets[1].status), (None, Some(200)));
    eprintln!("fetch: slow {:.3} s, clean {:.3} s", r.timings.fetch, results[CLEAN].timings.fetch);
}

#[test]
fn a_fault_that_outlasts_every_retry_fails_as_storage_and_is_dead_lettered() {
    let cases = ["doomed"];
    let mut t = Setup::new("s3-doomed", 2, &cases);
    t.proxy.add(Rule::always("GET", "inputs/doomed.png", Fault::Status(503, "SlowDown")));
    let _worker = t.worker(2, &[]);
    let results = t.run(&cases, Duration::from_secs(90));

    t.assert_output_is_clean(&results, CLEAN);
    let r = &results["doomed"];
    let error = r.error.clone().expect("an error");
    assert_eq!(
        (r.status, error.kind, error.retryable, r.attempt, r.output.as_deref()),
        (Status::Failed, ErrorKind::Storage, true, 3, None),
        "{r:?}"
    );
    assert!(error.message.contains("503") && error.message.contains("SlowDown"), "{}", error.message);
    let dead = t.broker.dead_letters_until(1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["x-retouch-error-kind"], "storage");
    assert_eq!(dead[0].1["x-retouch-attempt"], "3");
    assert!(String::from_utf8_lossy(&dead[0].0).contains("doomed"), "the body is kept");
    // 3 deliveries × 2 SDK attempts, every one answered 503 by the proxy; nothing was written.
    let gets = t.proxy.seen_for("GET", "inputs/doomed.png");
    assert_eq!(gets.len(), 6, "{gets:?}");
    assert!(gets.iter().all(|g| g.status == Some(503)), "{gets:?}");
    assert!(t.proxy.seen_for("PUT", &t.output_key("doomed")).is_empty());
    assert_eq!(t.output("doomed"), None, "no output for a failed job");
}
