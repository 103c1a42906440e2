//! Campaigns end to end: `retouch submit` (manifest and prefix), `retouch watch` (to a report,
//! interrupted and resumed), `retouch dead-letters list|redrive`, with a worker running against
//! the real broker and S3 server; and `retouch batch` on a folder with broken files.

use std::collections::BTreeSet;
use std::time::Duration;

use retouch_core::job::JobResult;
use retouch_e2e::{Broker, Env, S3Server, Worker, command, run_cli, temp_dir, test_png, tiny_model, unique};

struct Campaign {
    name: String,
    s3: S3Server,
    broker: Broker,
    /// Manifests, reports and watch state.
    files: tempfile::TempDir,
}

fn setup(test: &str, images: usize) -> Campaign {
    let env = Env::get();
    let name = unique(test);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..images {
        s3.put("inputs", &format!("raw/img{i}.png"), &test_png(i as u8 * 13));
    }
    let broker = Broker::new(&env.amqp_url, &name, 3);
    Campaign { files: temp_dir(&name), name, s3, broker }
}

impl Campaign {
    fn retouch(&self, args: &[&str]) -> (i32, String, String) {
        run_cli(command(&self.name, &self.broker.worker_env(3), &self.s3, &[]), args)
    }

    fn worker(&self) -> Worker {
        let mut w =
            Worker::start(&self.name, &self.broker.worker_env(3), &self.s3, &[("RETOUCH_ENGINE_MAX_BATCH", "4")]);
        w.wait_ready();
        w
    }

    fn tmp(&self, file: &str) -> String {
        self.files.path().join(file).display().to_string()
    }
}

fn assert_ok(what: &str, (code, out, err): &(i32, String, String)) {
    assert_eq!(*code, 0, "{what} failed:\nstdout: {out}\nstderr: {err}");
}

/// The report's rows after the header, read by a CSV parser (quoted fields included).
fn csv_rows(path: &str) -> Vec<Vec<String>> {
    let mut reader = csv::Reader::from_path(path).expect("report");
    let header: Vec<String> = reader.headers().expect("header").iter().map(str::to_string).collect();
    assert_eq!(
        header,
        [
            "job_id",
            "source",
            "output",
            "status",
            "error_kind",
            "error_message",
            "attempt",
            "duplicate",
            "inference_s",
            "total_s"
        ]
    );
    reader.records().map(|r| r.expect("a CSV row").iter().map(str::to_string).collect()).collect()
}

#[test]
fn submit_from_a_manifest_and_a_prefix_then_watch_to_a_report() {
    let c = setup("submit", 4);
    let _worker = c.worker();
    // From a prefix: every image under s3://inputs/raw/.
    let prefix_out = format!("s3://outputs/{}/prefix", c.name);
    let submitted = c.retouch(&[
        "submit",
        "--campaign",
        "byprefix",
        "--source",
        "s3://inputs/raw/",
        "--instruction",
        "make it snowy",
        "--output",
        &prefix_out,
        "--steps",
        "3",
    ]);
    assert_ok("submit --source", &submitted);
    assert!(submitted.1.contains("published 4 new job(s)"), "{}", submitted.1);
    let report = c.tmp("prefix.csv");
    let watched = c.retouch(&[
        "watch",
        "--campaign",
        "byprefix",
        "--ledger",
        &prefix_out,
        "--report",
        &report,
        "--state",
        &c.tmp("prefix.state"),
        "--timeout",
        "3m",
    ]);
    assert_ok("watch", &watched);
    let rows = csv_rows(&report);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r[3] == "succeeded"), "{rows:?}");
    for r in &rows {
        let key = r[2].trim_start_matches("s3://outputs/");
        let bytes = c.s3.get("outputs", key).unwrap_or_else(|| panic!("{} missing", r[2]));
        assert_eq!(image::load_from_memory(&bytes).expect("png").width(), 64);
    }

    // The same submit again adds nothing.
    let again = c.retouch(&[
        "submit",
        "--campaign",
        "byprefix",
        "--source",
        "s3://inputs/raw/",
        "--instruction",
        "make it snowy",
        "--output",
        &prefix_out,
        "--steps",
        "3",
    ]);
    assert_ok("second submit", &again);
    assert!(again.1.contains("published 0 new job(s)") && again.1.contains("4 were already submitted"), "{}", again.1);

    // From a JSONL manifest (one row with its own instruction and output).
    let manifest = c.tmp("jobs.jsonl");
    std::fs::write(
        &manifest,
        "{\"source\": \"s3://inputs/raw/img0.png\", \"instruction\": \"turn it into a painting\"}\n\
         {\"source\": \"s3://inputs/raw/img1.png\", \"output\": \"s3://outputs/manifest/one.jpg\", \"params\": {\"format\": \"jpeg\"}}\n",
    )
    .expect("manifest");
    let ledger = format!("s3://outputs/{}/ledgers", c.name);
    let dry = c.retouch(&[
        "submit",
        "--campaign",
        "bymanifest",
        "--manifest",
        &manifest,
        "--instruction",
        "add fog",
        "--steps",
        "3",
        "--ledger",
        &ledger,
        "--dry-run",
    ]);
    assert_ok("dry run", &dry);
    assert!(dry.1.contains("dry run: 2 new job(s)"), "{}", dry.1);
    let sub = c.retouch(&[
        "submit",
        "--campaign",
        "bymanifest",
        "--manifest",
        &manifest,
        "--instruction",
        "add fog",
        "--steps",
        "3",
        "--ledger",
        &ledger,
    ]);
    assert_ok("submit --manifest", &sub);
    let report = c.tmp("manifest.jsonl");
    assert_ok(
        "watch manifest",
        &c.retouch(&[
            "watch",
            "--campaign",
            "bymanifest",
            "--ledger",
            &ledger,
            "--report",
            &report,
            "--state",
            &c.tmp("manifest.state"),
            "--timeout",
            "3m",
        ]),
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&report)
        .expect("report")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["status"] == "succeeded"), "{lines:?}");
    assert!(c.s3.get("outputs", "manifest/one.jpg").is_some(), "the row's own output was used");
}

#[test]
fn an_interrupted_watch_resumes_without_losing_results() {
    let mut c = setup("resume", 6);
    let out = format!("s3://outputs/{}/edits", c.name);
    assert_ok(
        "submit",
        &c.retouch(&[
            "submit",
            "--campaign",
            "resume",
            "--source",
            "s3://inputs/raw/",
            "--instruction",
            "x",
            "--output",
            &out,
            "--steps",
            "20",
        ]),
    );
    // One job at a time, stopped after two results: it finishes the job in hand and gives the
    // others back, so the campaign is unfinished while the first watch runs.
    let one_at_a_time = [("RETOUCH_ENGINE_MAX_BATCH", "1"), ("RETOUCH_AMQP_PREFETCH", "1")];
    let mut worker = Worker::start(&c.name, &c.broker.worker_env(3), &c.s3, &one_at_a_time);
    worker.wait_ready();
    let mut early = c.broker.results_until(Duration::from_secs(120), |r| r.len() >= 2);
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0), "{}", worker.logs());
    early.extend(c.broker.drain_results());
    let done = early.len();
    assert!((2..6).contains(&done), "the worker stopped mid-campaign: {done} results");

    // The first watch keeps every result there is, then its deadline interrupts it.
    let (state, report) = (c.tmp("state.jsonl"), c.tmp("report.csv"));
    let watch = |timeout: &str| {
        c.retouch(&[
            "watch",
            "--campaign",
            "resume",
            "--ledger",
            &out,
            "--report",
            &report,
            "--state",
            &state,
            "--timeout",
            timeout,
        ])
    };
    let first = watch("5s");
    assert_eq!(first.0, 1, "{first:?}");
    assert!(first.2.contains("timed out"), "{first:?}");
    assert!(first.1.contains(&format!("{done}/6 jobs have results")), "{first:?}");
    assert_eq!(state_ids(&state), early.keys().cloned().collect(), "the state holds the results so far");
    assert!(!std::path::Path::new(&report).exists(), "no report before every job has a result");

    // The campaign goes on; the resumed watch adds the rest to the same state.
    let _worker = c.worker();
    let second = watch("3m");
    assert_ok("resumed watch", &second);
    assert!(second.1.contains("6/6 jobs have results"), "{}", second.1);
    let rows = csv_rows(&report);
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r[3] == "succeeded"), "{rows:?}");
    assert_eq!(state_ids(&state).len(), 6);
}

/// The job ids in a watch state file.
fn state_ids(path: &str) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .expect("state file")
        .lines()
        .map(|l| serde_json::from_str::<JobResult>(l).expect("a result per line").job_id)
        .collect()
}

#[test]
fn redrive_after_the_cause_is_fixed_brings_dead_letters_to_success() {
    let c = setup("redrive", 0);
    let _worker = c.worker();
    let manifest = c.tmp("jobs.jsonl");
    std::fs::write(&manifest, "{\"source\": \"s3://inputs/late/a.png\"}\n{\"source\": \"s3://inputs/late/b.png\"}\n")
        .expect("manifest");
    let ledger = format!("s3://outputs/{}/ledgers", c.name);
    assert_ok(
        "submit",
        &c.retouch(&[
            "submit",
            "--campaign",
            "late",
            "--manifest",
            &manifest,
            "--instruction",
            "x",
            "--steps",
            "3",
            "--ledger",
            &ledger,
        ]),
    );
    let (state, report) = (c.tmp("state.jsonl"), c.tmp("report.csv"));
    assert_ok(
        "watch (failures)",
        &c.retouch(&[
            "watch",
            "--campaign",
            "late",
            "--ledger",
            &ledger,
            "--report",
            &report,
            "--state",
            &state,
            "--keep-queue",
            "--timeout",
            "2m",
        ]),
    );
    let rows = csv_rows(&report);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r[3] == "failed" && r[4] == "source_not_found"), "{rows:?}");

    let listed = c.retouch(&["dead-letters", "list", "--campaign", "late"]);
    assert_ok("list", &listed);
    assert!(listed.1.contains("source_not_found") && listed.1.contains("2 shown of 2 dead letters"), "{}", listed.1);

    // Fix the cause, then re-drive only this campaign's source_not_found letters.
    c.s3.put("inputs", "late/a.png", &test_png(1));
    c.s3.put("inputs", "late/b.png", &test_png(2));
    let redriven = c.retouch(&["dead-letters", "redrive", "--campaign", "late", "--reason", "source_not_found"]);
    assert_ok("redrive", &redriven);
    assert!(redriven.1.contains("re-drove 2 of 2"), "{}", redriven.1);
    std::fs::remove_file(&state).ok();
    // A new watch (fresh state) sees the re-driven jobs succeed.
    let watched = c.retouch(&[
        "watch",
        "--campaign",
        "late",
        "--ledger",
        &ledger,
        "--report",
        &report,
        "--state",
        &state,
        "--timeout",
        "2m",
    ]);
    assert_ok("watch (after redrive)", &watched);
    let rows = csv_rows(&report);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r[3] == "succeeded"), "{rows:?}");
    assert_eq!(c.broker.ready("dead"), 0, "no dead letters left");
}

#[test]
fn local_batch_on_a_folder_with_broken_files() {
    let dir = temp_dir(&unique("batch"));
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&input).expect("mkdir");
    for i in 0..3 {
        std::fs::write(input.join(format!("good{i}.png")), test_png(i * 40)).expect("write");
    }
    std::fs::write(input.join("broken.png"), b"not a png").expect("write");
    let mut truncated = test_png(9);
    truncated.truncate(200);
    std::fs::write(input.join("truncated.png"), truncated).expect("write");
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(retouch_e2e::retouch_bin());
        cmd.args([
            "batch",
            "--model",
            &tiny_model().display().to_string(),
            "--input-dir",
            &input.display().to_string(),
            "--output-dir",
            &output.display().to_string(),
            "--instruction",
            "make it snowy",
            "--steps",
            "3",
        ]);
        run_cli(cmd, args)
    };
    let (code, out, err) = run(&[]);
    assert_eq!(code, 1, "some images failed → exit 1\n{out}\n{err}");
    assert!(out.contains("5 images: 3 edited, 0 already done, 2 failed"), "{out}");
    let report = std::fs::read_to_string(output.join("report.jsonl")).expect("report");
    let failed: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|r| r["error"]["kind"] == "invalid_image"), "{failed:?}");
    for i in 0..3 {
        assert!(output.join(format!("good{i}.png")).is_file());
    }
    // Running it again resumes: nothing is edited twice.
    let (_, out, _) = run(&[]);
    assert!(out.contains("0 edited, 3 already done, 2 failed"), "{out}");
}
