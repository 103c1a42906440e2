//! Fleet benchmark against the real services (run through the test environment):
//!
//! ```sh
//! eval "$(./tests/run --services-only)"
//! cargo run -p retouch-e2e --example fleet_bench -- [--jobs 200] [--steps 2] [--submit-jobs 20000]
//! ```
//!
//! Measures, with the tiny checkpoint so model compute is small:
//! * the worker's own work per job, from the results' timings: fetch + decode + encode +
//!   upload (the model's share is `inference`; the rest of `total` is waiting in the worker's
//!   bounded pipeline for the model, since every job is published at once);
//! * throughput for 1 and 2 workers (first publish → last result), and the model's
//!   utilisation: seconds of inference summed over batches ÷ (wall × workers). A job's
//!   `inference` is its batch's time, so the batches are the distinct values. 100 % means the
//!   fetch/decode/encode/upload/publish/ack work is fully hidden behind inference;
//! * `retouch submit` publishing rate from a manifest (no worker attached).

use std::time::{Duration, Instant};

use retouch_e2e::{Broker, Env, S3Server, Worker, command, run_cli, test_png, unique};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Per-run measurements.
struct Run {
    /// First publish → last result.
    seconds: f64,
    /// Per job, sorted: fetch + decode + encode + upload.
    own_work: Vec<f64>,
    /// Inference seconds of each batch.
    batches: Vec<f64>,
}

fn run_workers(env: &Env, workers: usize, jobs: usize, steps: usize) -> Run {
    let name = unique(&format!("bench{workers}"));
    let s3 = S3Server::start(env, &name, &["inputs", "outputs"]);
    for i in 0..8 {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 31));
    }
    let mut broker = Broker::new(&env.amqp_url, &name, 3);
    let mut fleet: Vec<Worker> = (0..workers)
        .map(|_| {
            Worker::start(&name, &broker.worker_env(3), &s3, &[("RETOUCH_ENGINE_MAX_BATCH", "4"), ("RUST_LOG", "warn")])
        })
        .collect();
    fleet.iter_mut().for_each(Worker::wait_ready);
    let started = Instant::now();
    for i in 0..jobs {
        broker.publish_json(&serde_json::json!({
            "job_id": format!("b{i}"), "source": format!("s3://inputs/img{}.png", i % 8),
            "instruction": "make it snowy", "params": {"steps": steps}
        }));
    }
    let results = broker.results_until(Duration::from_secs(1800), |r| r.len() >= jobs);
    let seconds = started.elapsed().as_secs_f64();
    let mut own_work: Vec<f64> =
        results.values().map(|r| &r.timings).map(|t| t.fetch + t.decode + t.encode + t.upload).collect();
    let distinct: std::collections::BTreeSet<u64> = results.values().map(|r| r.timings.inference.to_bits()).collect();
    let mut batches: Vec<f64> = distinct.into_iter().map(f64::from_bits).collect();
    own_work.sort_by(f64::total_cmp);
    batches.sort_by(f64::total_cmp);
    for w in &mut fleet {
        w.terminate(Duration::from_secs(60));
    }
    Run { seconds, own_work, batches }
}

fn main() {
    let env = Env::get();
    let jobs = arg("--jobs", 200);
    let steps = arg("--steps", 2);
    let submit_jobs = arg("--submit-jobs", 20_000);
    println!("fleet benchmark: {jobs} jobs of 64×64 px, {steps} steps, tiny checkpoint, max_batch 4");
    println!(
        "| workers | wall s | jobs/s | batches | jobs per batch | own work per job p50 / p95 ms | inference per batch p50 ms | model utilisation |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for workers in [1, 2] {
        let run = run_workers(&env, workers, jobs, steps);
        let busy: f64 = run.batches.iter().sum();
        println!(
            "| {workers} | {:.1} | {:.1} | {} | {:.2} | {:.1} / {:.1} | {:.1} | {:.0} % |",
            run.seconds,
            jobs as f64 / run.seconds,
            run.batches.len(),
            jobs as f64 / run.batches.len() as f64,
            percentile(&run.own_work, 0.5) * 1e3,
            percentile(&run.own_work, 0.95) * 1e3,
            percentile(&run.batches, 0.5) * 1e3,
            100.0 * busy / (run.seconds * workers as f64),
        );
    }

    // Submit rate: a manifest of `submit_jobs` rows, no worker.
    let name = unique("submitbench");
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    let broker = Broker::new(&env.amqp_url, &name, 3);
    let manifest = std::env::temp_dir().join(format!("{name}.jsonl"));
    let rows: String = (0..submit_jobs).map(|i| format!("{{\"source\": \"s3://inputs/raw/img{i}.png\"}}\n")).collect();
    std::fs::write(&manifest, rows).expect("manifest");
    let started = Instant::now();
    let (code, out, err) = run_cli(
        command(&name, &broker.worker_env(3), &s3, &[("RUST_LOG", "warn")]),
        &["submit", "--campaign", "bench", "--manifest", &manifest.display().to_string(), "--instruction", "x"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let wall = started.elapsed().as_secs_f64();
    println!(
        "\nsubmit: {submit_jobs} jobs from a manifest, whole command {wall:.2} s ({:.0} jobs/s end to end)",
        submit_jobs as f64 / wall
    );
    println!("{}", out.lines().next().unwrap_or_default());
    assert_eq!(broker.ready("jobs") as usize, submit_jobs, "every job is in the queue");
}
