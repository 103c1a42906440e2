//! The safety checker end to end, on the committed `tiny-sd15-safety` checkpoint (a tiny random
//! `StableDiffusionSafetyChecker` whose thresholds flag `images/alpha.png` edited with "make it
//! snowy", seed 0, 10 steps, and not `images/a.png`; see `tests/fixtures/README.md`):
//! `retouch edit` (black, block, off), `retouch batch` with the policy, a worker that flags
//! (result, metric) and one that blocks (`nsfw` failure, no output, dead letter), and
//! `retouch fetch-model` fetching the checker's files only when the policy needs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use retouch_core::error::ErrorKind;
use retouch_core::job::{JobResult, Status};
use retouch_e2e::{
    Broker, Env, S3Server, Worker, fixtures, max_diff, open_rgb, retouch_bin, run_cli, temp_dir, tiny_model, unique,
};
use serde_json::json;

fn safety_model() -> PathBuf {
    fixtures().join("models/tiny-sd15-safety")
}

fn is_black(image: &image::RgbImage) -> bool {
    image.as_raw().iter().all(|&v| v == 0)
}

/// `retouch edit` of one fixture image with the safety cases' settings.
fn edit(image: &str, output: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(retouch_bin());
    cmd.arg("edit").env("RUST_LOG", "warn").env_remove("RETOUCH_MODEL_SAFETY_CHECKER");
    let mut args = vec![
        "--model".to_string(),
        safety_model().display().to_string(),
        "--image".into(),
        fixtures().join(image).display().to_string(),
        "--instruction".into(),
        "make it snowy".into(),
        "--seed".into(),
        "0".into(),
        "--steps".into(),
        "10".into(),
        "--output".into(),
        output.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(cmd, &refs)
}

#[test]
fn edit_writes_flagged_images_black_like_diffusers_blocks_them_or_skips_the_checker() {
    let tmp = temp_dir("safety-edit");
    let dir = tmp.path();
    // Default (auto): the checkpoint names a checker, so it runs (as in diffusers).
    let flagged = dir.join("flagged.png");
    let (code, out, err) = edit("images/alpha.png", &flagged, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("nsfw content detected"), "{err}");
    assert!(is_black(&open_rgb(&flagged)), "diffusers' output is black");
    assert_eq!(open_rgb(&flagged), open_rgb(&fixtures().join("golden/safety_flagged_0.png")));

    let clear = dir.join("clear.png");
    let (code, out, err) = edit("images/a.png", &clear, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("nsfw"), "{err}");
    let d = max_diff(&open_rgb(&clear), &open_rgb(&fixtures().join("golden/safety_clear_0.png")));
    assert!(d <= 2, "unflagged output within 2/255 of diffusers: {d}");

    // block: nothing written, a failure exit with a one-line reason.
    let blocked = dir.join("blocked.png");
    let (code, _, err) = edit("images/alpha.png", &blocked, &["--safety-checker", "block"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nsfw") && err.contains("nothing was written"), "{err}");
    assert!(!blocked.exists(), "no output under block");

    // off: the image the checker would have flagged.
    let unchecked = dir.join("unchecked.png");
    let (code, out, err) = edit("images/alpha.png", &unchecked, &["--safety-checker", "off"]);
    assert_eq!(code, 0, "{out}{err}");
    let d = max_diff(&open_rgb(&unchecked), &open_rgb(&fixtures().join("safety/inputs/safety_flagged_0.png")));
    assert!(d <= 2 && !is_black(&open_rgb(&unchecked)), "off: as without a checker ({d})");

    // on: a checkpoint without a checker is bad input.
    let mut cmd = Command::new(retouch_bin());
    cmd.arg("edit").env("RUST_LOG", "warn");
    let (code, _, err) = run_cli(
        cmd,
        &[
            "--model",
            &tiny_model().display().to_string(),
            "--image",
            &fixtures().join("images/a.png").display().to_string(),
            "--instruction",
            "x",
            "--output",
            &dir.join("none.png").display().to_string(),
            "--safety-checker",
            "on",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--safety-checker on") && err.contains("safety_checker"), "{err}");
}

fn report(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("report")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn by_source<'a>(rows: &'a [serde_json::Value], file: &str) -> &'a serde_json::Value {
    rows.iter()
        .rev()
        .find(|r| r["source"].as_str().is_some_and(|s| s.ends_with(file)))
        .unwrap_or_else(|| panic!("no result for {file}: {rows:?}"))
}

#[test]
fn batch_applies_the_safety_policy_per_image() {
    let tmp = temp_dir("safety-batch");
    let dir = tmp.path();
    let input = dir.join("in");
    std::fs::create_dir_all(&input).expect("mkdir");
    for name in ["alpha.png", "a.png"] {
        std::fs::copy(fixtures().join("images").join(name), input.join(name)).expect("copy");
    }
    let run = |output: &Path, policy: &str| {
        let mut cmd = Command::new(retouch_bin());
        cmd.env_remove("RETOUCH_MODEL_SAFETY_CHECKER");
        run_cli(
            cmd,
            &[
                "batch",
                "--model",
                &safety_model().display().to_string(),
                "--input-dir",
                &input.display().to_string(),
                "--output-dir",
                &output.display().to_string(),
                "--instruction",
                "make it snowy",
                "--seed",
                "0",
                "--steps",
                "10",
                "--safety-checker",
                policy,
            ],
        )
    };
    // on: both written (the two share one model call), the flagged one black.
    let out = dir.join("on");
    let (code, stdout, stderr) = run(&out, "on");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let rows = report(&out.join("report.jsonl"));
    assert_eq!(by_source(&rows, "alpha.png")["nsfw_content_detected"], true);
    assert_eq!(by_source(&rows, "/a.png")["nsfw_content_detected"], false);
    assert!(is_black(&open_rgb(&out.join("alpha.png"))));
    let d = max_diff(&open_rgb(&out.join("a.png")), &open_rgb(&fixtures().join("golden/safety_clear_0.png")));
    assert!(d <= 2, "{d}");

    // block: the flagged image fails with kind nsfw and has no output; the other succeeds.
    let out = dir.join("block");
    let (code, stdout, stderr) = run(&out, "block");
    assert_eq!(code, 1, "a failed image → exit 1\n{stdout}{stderr}");
    assert!(stdout.contains("2 images: 1 edited, 0 already done, 1 failed"), "{stdout}");
    let rows = report(&out.join("report.jsonl"));
    let blocked = by_source(&rows, "alpha.png");
    assert_eq!((&blocked["status"], &blocked["error"]["kind"]), (&json!("failed"), &json!("nsfw")), "{blocked}");
    assert_eq!((&blocked["output"], &blocked["nsfw_content_detected"]), (&json!(null), &json!(true)));
    assert!(!out.join("alpha.png").exists(), "no output under block");
    assert_eq!(by_source(&rows, "/a.png")["status"], "succeeded");
}

fn setup(test: &str) -> (Env, String, S3Server, Broker) {
    let env = Env::get();
    let name = unique(test);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for file in ["alpha.png", "a.png"] {
        s3.put("inputs", file, &std::fs::read(fixtures().join("images").join(file)).expect("fixture image"));
    }
    let broker = Broker::new(&env.amqp_url, &name, 5);
    (env, name, s3, broker)
}

fn job(id: &str, file: &str) -> serde_json::Value {
    json!({"job_id": id, "source": format!("s3://inputs/{file}"), "instruction": "make it snowy",
           "params": {"steps": 10, "seed": 0}})
}

fn output(s3: &S3Server, r: &JobResult) -> image::RgbImage {
    let url = r.output.as_deref().expect("output");
    let (bucket, key) = url.trim_start_matches("s3://").split_once('/').expect("s3 url");
    image::load_from_memory(&s3.get(bucket, key).expect("output object")).expect("decodes").to_rgb8()
}

#[test]
fn a_worker_writes_flagged_images_black_and_counts_them() {
    let (_env, name, s3, mut broker) = setup("safety-flag");
    let model = safety_model().display().to_string();
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &[("RETOUCH_MODEL_SOURCE", model.as_str())]);
    worker.wait_ready();
    broker.publish_json(&job("flagged", "alpha.png"));
    broker.publish_json(&job("clear", "a.png"));
    let results = broker.results_until(Duration::from_secs(120), |r| r.len() >= 2);
    let flagged = &results["flagged"];
    assert_eq!((flagged.status, flagged.nsfw_content_detected), (Status::Succeeded, Some(true)), "{flagged:?}");
    assert!(is_black(&output(&s3, flagged)), "the flagged output is black, as diffusers writes it");
    let clear = &results["clear"];
    assert_eq!((clear.status, clear.nsfw_content_detected), (Status::Succeeded, Some(false)), "{clear:?}");
    let d = max_diff(&output(&s3, clear), &open_rgb(&fixtures().join("golden/safety_clear_0.png")));
    assert!(d <= 2, "{d}");
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    assert!(metrics.lines().any(|l| l == "retouch_nsfw_flagged_total 1"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l == r#"retouch_jobs_total{error_kind="none",outcome="succeeded"} 2"#),
        "{metrics}"
    );
}

#[test]
fn a_blocking_worker_fails_flagged_jobs_with_kind_nsfw_and_dead_letters_them() {
    let (_env, name, s3, mut broker) = setup("safety-block");
    let model = safety_model().display().to_string();
    let extra = [("RETOUCH_MODEL_SOURCE", model.as_str()), ("RETOUCH_MODEL_SAFETY_CHECKER", "block")];
    let mut worker = Worker::start(&name, &broker.worker_env(5), &s3, &extra);
    worker.wait_ready();
    broker.publish_json(&job("blocked", "alpha.png"));
    broker.publish_json(&job("fine", "a.png"));
    let results = broker.results_until(Duration::from_secs(120), |r| r.len() >= 2);
    let r = &results["blocked"];
    let error = r.error.clone().expect("error");
    assert_eq!(
        (r.status, error.kind, error.retryable, r.attempt),
        (Status::Failed, ErrorKind::Nsfw, false, 1),
        "{r:?}"
    );
    assert_eq!((r.output.as_deref(), r.nsfw_content_detected), (None, Some(true)));
    assert!(s3.get("outputs", &format!("{name}/blocked.png")).is_none(), "no output object");
    assert_eq!(results["fine"].status, Status::Succeeded);
    let dead = broker.dead_letters_until(1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["x-retouch-error-kind"], "nsfw");
    assert!(String::from_utf8_lossy(&dead[0].0).contains("blocked"), "the body is kept");
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    assert!(metrics.lines().any(|l| l == r#"retouch_jobs_total{error_kind="nsfw",outcome="failed"} 1"#), "{metrics}");
    assert!(metrics.lines().any(|l| l == r#"retouch_dead_letters_total{error_kind="nsfw"} 1"#), "{metrics}");
    assert!(metrics.lines().any(|l| l == "retouch_nsfw_flagged_total 1"), "{metrics}");
    assert!(worker.try_status().is_none(), "the worker keeps running");
}

/// A Hugging Face cache holding the safety fixture without its checker's files.
fn cache_without_checker(home: &Path, repo: &str) {
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let root = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("refs")).expect("refs");
    std::fs::write(root.join("refs/main"), commit).expect("ref");
    let snapshot = root.join("snapshots").join(commit);
    let model = safety_model();
    let mut stack = vec![model.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").filter_map(Result::ok) {
            let path = entry.path();
            let relative = path.strip_prefix(&model).expect("relative").to_path_buf();
            let top = relative.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
            if matches!(top.as_deref(), Some("safety_checker" | "feature_extractor")) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let target = snapshot.join(&relative);
                std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                std::fs::copy(&path, &target).expect("copy");
            }
        }
    }
}

#[test]
fn fetch_model_needs_the_checker_files_only_when_the_policy_runs_the_checker() {
    let tmp = temp_dir("safety-hf");
    let home = tmp.path();
    cache_without_checker(home, "retouch-test/tiny-safety");
    let fetch = |policy: &str| {
        let mut cmd = Command::new(retouch_bin());
        cmd.env("HF_HOME", home).env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "warn").env_remove("RETOUCH_CONFIG");
        run_cli(cmd, &["fetch-model", "--model", "hf:retouch-test/tiny-safety", "--safety-checker", policy])
    };
    let (code, stdout, stderr) = fetch("off");
    assert_eq!(code, 0, "off needs no checker files: {stdout}{stderr}");
    assert!(stdout.trim().ends_with("89abcdef0123456789abcdef0123456789abcdef"), "{stdout}");
    // auto: model_index.json names a checker, so its files are needed (and missing offline).
    let (code, _, stderr) = fetch("auto");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("safety_checker/config.json") && stderr.contains("not in the Hub cache"), "{stderr}");
}
