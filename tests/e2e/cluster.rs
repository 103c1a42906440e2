//! Broker cluster soak: a private 3-node RabbitMQ cluster (deploy/test-services/
//! rabbitmq-cluster.sh), the quorum topology across it, three workers each given the URL list
//! starting at a different node, a campaign of hundreds of tiny jobs, and mid-campaign a
//! `kill -9` of one node's VM (restarted later), then `stop_app` of another (started later).
//! Holds when every job has exactly one succeeded output (results may repeat: they are
//! at-least-once), nothing is dead-lettered, and the workers' metrics show reconnects.
//!
//! Node 1 is never faulted: the harness's inspection connection and its classic results tap
//! queue live there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use retouch_core::job::{JobResult, Status};
use retouch_e2e::{Broker, Env, JobPublishOptions, S3Server, Worker, temp_dir, test_png, unique, workspace};
use serde_json::json;

/// A private 3-node cluster; stopped (and its directory removed) on drop.
struct Cluster {
    script: PathBuf,
    dir: tempfile::TempDir,
    urls: Vec<String>,
}

impl Cluster {
    fn start(name: &str) -> Self {
        let script = workspace().join("deploy/test-services/rabbitmq-cluster.sh");
        let dir = temp_dir(&format!("{name}-cluster"));
        let mut cluster = Self { script, dir, urls: Vec::new() };
        cluster.run(&["start"]);
        let out = Command::new(&cluster.script)
            .args(["urls", &cluster.dir.path().display().to_string()])
            .output()
            .expect("rabbitmq-cluster.sh urls");
        cluster.urls = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        assert_eq!(cluster.urls.len(), 3, "{:?}", cluster.urls);
        cluster
    }

    fn run(&self, args: &[&str]) {
        let dir = self.dir.path().display().to_string();
        let t0 = Instant::now();
        let status =
            Command::new(&self.script).arg(args[0]).arg(&dir).args(&args[1..]).status().expect("rabbitmq-cluster.sh");
        assert!(status.success(), "rabbitmq-cluster.sh {args:?} failed");
        eprintln!("[cluster] {args:?} took {:.1} s", t0.elapsed().as_secs_f64());
    }

    /// The URL list starting at node `first` (0-based), as `RETOUCH_AMQP_URL` takes it.
    fn url_list(&self, first: usize) -> String {
        (0..3).map(|k| self.urls[(first + k) % 3].as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).args(["stop", &self.dir.path().display().to_string()]).status();
    }
}

fn metric(worker: &Worker, name: &str) -> f64 {
    worker.metric(name).unwrap_or(0.0)
}

const JOBS: usize = 300;
const INPUTS: usize = 8;

#[test]
fn a_cluster_losing_nodes_mid_campaign_loses_and_dead_letters_nothing() {
    let t0 = Instant::now();
    let env = Env::get();
    let name = unique("cluster");
    // Declared first, dropped last (after the workers and the broker objects).
    let cluster = Cluster::start(&name);
    let started = t0.elapsed();
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..INPUTS {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 17));
    }
    let mut broker = Broker::new(&cluster.urls[0], &name, 5);
    let broker_env = broker.worker_env(5);
    let lists: Vec<String> = (0..3).map(|i| cluster.url_list(i)).collect();
    let mut workers: Vec<Worker> = lists
        .iter()
        .enumerate()
        .map(|(i, urls)| {
            let extra = [
                ("RETOUCH_AMQP_URL", urls.as_str()),
                ("RETOUCH_AMQP_CONNECTION_NAME", ["w0", "w1", "w2"][i]),
                ("RETOUCH_AMQP_RECONNECT_BACKOFF_MIN", "200ms"),
                ("RETOUCH_AMQP_RECONNECT_BACKOFF_MAX", "2s"),
                ("RETOUCH_ENGINE_MAX_BATCH", "4"),
            ];
            Worker::start(&name, &broker_env, &s3, &extra)
        })
        .collect();
    for w in &mut workers {
        w.wait_ready();
    }

    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            json!({"job_id": format!("c-{i:04}"), "source": format!("s3://inputs/img{}.png", i % INPUTS),
                   "instruction": "make it snowy", "params": {"steps": 1}})
        })
        .collect();
    broker.publish_many(&jobs, &JobPublishOptions::default());
    eprintln!("[cluster] published {JOBS} jobs at {:.1} s", t0.elapsed().as_secs_f64());

    // Faults at given numbers of distinct results: kill -9 node 2, start it, stop_app node 3,
    // start_app node 3.
    let faults: [(usize, &[&str]); 4] = [
        (JOBS / 6, &["kill-node", "2"]),
        (JOBS * 2 / 6, &["start-node", "2"]),
        (JOBS * 3 / 6, &["stop-app", "3"]),
        (JOBS * 4 / 6, &["start-app", "3"]),
    ];
    let mut next_fault = 0;
    let mut results: BTreeMap<String, JobResult> = BTreeMap::new();
    let mut deliveries = 0usize;
    while results.len() < JOBS {
        if next_fault < faults.len() && results.len() >= faults[next_fault].0 {
            eprintln!(
                "[cluster] {} results at {:.1} s: {:?}",
                results.len(),
                t0.elapsed().as_secs_f64(),
                faults[next_fault].1
            );
            cluster.run(faults[next_fault].1);
            next_fault += 1;
            continue;
        }
        // One result per call, so that repeated results are counted.
        let one = broker.results_until(Duration::from_secs(120), |r| !r.is_empty());
        for (id, r) in one {
            deliveries += 1;
            results.insert(id, r);
        }
    }
    // Late duplicates (a result republished after a lost confirm) may still arrive.
    std::thread::sleep(Duration::from_secs(2));
    for (id, r) in broker.drain_results() {
        deliveries += 1;
        results.insert(id, r);
    }
    let campaign = t0.elapsed();

    let mut missing_outputs = Vec::new();
    for (id, r) in &results {
        assert_eq!(r.status, Status::Succeeded, "{id}: {r:?}");
        let key = format!("{name}/{id}.png");
        assert_eq!(r.output.as_deref(), Some(format!("s3://outputs/{key}").as_str()));
        if s3.get("outputs", &key).is_none() {
            missing_outputs.push(id.clone());
        }
    }
    let dead = broker.dead_letters();
    let reconnects: Vec<f64> = workers.iter().map(|w| metric(w, "retouch_amqp_reconnects_total")).collect();
    let succeeded: Vec<f64> =
        workers.iter().map(|w| metric(w, r#"retouch_jobs_total{error_kind="none",outcome="succeeded"}"#)).collect();
    eprintln!(
        "[cluster] SUMMARY jobs={JOBS} results={} distinct={} duplicated_results={} faults_injected={next_fault} \
         dead_letters={} missing_outputs={} reconnects_per_worker={reconnects:?} succeeded_per_worker={succeeded:?} \
         cluster_start={:.1}s wall={:.1}s",
        deliveries,
        results.len(),
        deliveries - results.len(),
        dead.len(),
        missing_outputs.len(),
        started.as_secs_f64(),
        campaign.as_secs_f64()
    );
    assert_eq!(results.len(), JOBS);
    assert_eq!(next_fault, faults.len(), "every fault was injected");
    assert!(missing_outputs.is_empty(), "outputs missing: {missing_outputs:?}");
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    assert!(reconnects.iter().any(|r| *r > 0.0), "no worker reconnected: {reconnects:?}");
    assert_eq!(broker.ready("jobs"), 0, "jobs left in the queue");
    for w in &mut workers {
        assert_eq!(w.terminate(Duration::from_secs(60)).code(), Some(0), "{}", w.logs());
    }
}
