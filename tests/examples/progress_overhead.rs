//! What progress events cost inference, measured against the real services:
//!
//! ```sh
//! eval "$(./tests/run --services-only)"
//! cargo run -p retouch-e2e --example progress_overhead -- [--pairs 12] [--steps 60] [--size 256]
//! ```
//!
//! One worker (`max_batch` 1), the tiny checkpoint on a `size`² source; jobs with and without
//! `"events": ["progress"]` alternate, each kind first in every other pair (so drift and
//! position hit both alike) and the results' own
//! `timings.inference` (the model call's wall time) are compared: median and mean per kind, and
//! the events that arrived.

use std::time::Duration;

use retouch_e2e::{Broker, Env, S3Server, Worker, unique};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (pairs, steps, size) = (arg("--pairs", 12), arg("--steps", 60), arg("--size", 256) as u32);
    let env = Env::get();
    let name = unique("overhead");
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    let image = image::RgbImage::from_fn(size, size, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 90]));
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).expect("png");
    s3.put("inputs", "src.png", png.get_ref());
    let mut broker = Broker::new(&env.amqp_url, &name, 3);
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "1"), ("RUST_LOG", "warn")];
    let mut worker = Worker::start(&name, &broker.worker_env(3), &s3, &extra);
    worker.wait_ready();
    // One warm-up job of each kind, then the measured pairs.
    let job = |id: String, events: bool| {
        let mut j = serde_json::json!({"job_id": id, "source": "s3://inputs/src.png", "instruction": "make it snowy",
            "params": {"steps": steps, "seed": 1}});
        if events {
            j["events"] = serde_json::json!(["progress"]);
        }
        j
    };
    for i in 0..=pairs {
        // Alternate which kind goes first, so neither always follows the other.
        let (first, second) = (job(format!("with-{i}"), true), job(format!("without-{i}"), false));
        let (first, second) = if i % 2 == 0 { (first, second) } else { (second, first) };
        broker.publish_json(&first);
        broker.publish_json(&second);
    }
    let results = broker.results_until(Duration::from_secs(3600), |r| r.len() >= 2 * (pairs + 1));
    broker.drain_results();
    let times = |prefix: &str| -> Vec<f64> {
        (1..=pairs).map(|i| results[&format!("{prefix}-{i}")].timings.inference).collect()
    };
    let (with, without) = (times("with"), times("without"));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let events = broker.events.iter().filter(|e| e.job_id.starts_with("with-")).count();
    println!(
        "progress events: {pairs} pairs, {steps} steps at {size}px, {events} events received for {} jobs",
        pairs + 1
    );
    println!("inference with events:    median {:.3} s, mean {:.3} s", median(with.clone()), mean(&with));
    println!("inference without events: median {:.3} s, mean {:.3} s", median(without.clone()), mean(&without));
    println!(
        "difference of medians: {:+.2} %",
        100.0 * (median(with.clone()) - median(without.clone())) / median(without.clone())
    );
    let _ = worker.terminate(Duration::from_secs(60));
}
