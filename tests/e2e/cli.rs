//! The `retouch edit` contract as scripts see it (flags, outputs, exit codes, one-line errors),
//! models from the Hugging Face cache offline, and a worker loading its model from S3.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use retouch_core::job::Status;
use retouch_e2e::{
    Broker, Env, S3Server, Worker, command, fixtures, open_rgb, retouch_bin, run_cli, temp_dir, test_png, tiny_model,
    unique, workspace,
};
use serde_json::json;

fn edit(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(retouch_bin());
    cmd.arg("edit").env("RUST_LOG", "warn");
    run_cli(cmd, args)
}

fn max_diff(a: &Path, b: &Path) -> u8 {
    retouch_e2e::max_diff(&open_rgb(a), &open_rgb(b))
}

#[test]
fn edit_reproduces_the_diffusers_golden_and_writes_every_format() {
    let tmp = temp_dir("edit");
    let dir = tmp.path();
    let model = tiny_model().display().to_string();
    let image = fixtures().join("images/a.png").display().to_string();
    let out = dir.join("snowy.png");
    let (code, stdout, stderr) = edit(&[
        "--model",
        &model,
        "--image",
        &image,
        "--instruction",
        "make it snowy",
        "--output",
        &out.display().to_string(),
        "--seed",
        "0",
        "--steps",
        "20",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("(64×64, 20 steps, euler-ancestral, seed 0)") && stdout.contains("s/step"), "{stdout}");
    assert!(max_diff(&out, &fixtures().join("golden/ea_default_0.png")) <= 2, "the CLI matches diffusers");

    // Random seed: printed, and the format follows the extension.
    for ext in ["jpg", "webp"] {
        let out = dir.join(format!("x.{ext}"));
        let (code, stdout, stderr) = edit(&[
            "--model",
            &model,
            "--image",
            &image,
            "--instruction",
            "x",
            "--output",
            &out.display().to_string(),
            "--steps",
            "2",
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stderr.contains("seed: "), "{stderr}");
        assert_eq!(image::open(&out).expect("decodes").width(), 64);
    }

    // --init-latents: diffusers' latents= (tests/fixtures/cases.json, case init_latents).
    let case_out = dir.join("init.png");
    let (code, stdout, stderr) = edit(&[
        "--model",
        &model,
        "--image",
        &image,
        "--instruction",
        "make it snowy",
        "--output",
        &case_out.display().to_string(),
        "--steps",
        "10",
        "--seed",
        "22",
        "--init-latents",
        &fixtures().join("latents/init_latents.safetensors").display().to_string(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Seed 22 draws the ancestral noise of every step; the initial latents come from the file.
    assert!(
        max_diff(&case_out, &fixtures().join("golden/init_latents_0.png")) <= 2,
        "--init-latents matches diffusers"
    );
}

#[test]
fn bad_input_exits_2_with_one_line_that_says_what_to_fix() {
    let tmp = temp_dir("badinput");
    let dir = tmp.path();
    let model = tiny_model().display().to_string();
    let image = fixtures().join("images/a.png").display().to_string();
    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, "hello").expect("write");
    let out = dir.join("o.png").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--image".into(), dir.join("missing.png").display().to_string()], "--image"),
        (vec!["--image".into(), not_image.display().to_string()], "not a valid image"),
        (vec!["--image".into(), image.clone(), "--scheduler".into(), "pndm".into()], "pndm"),
        (vec!["--image".into(), image.clone(), "--steps".into(), "0".into()], "--steps"),
        // GPU levers a CPU run (or a build without them) cannot honour: refused, never ignored.
        (vec!["--image".into(), image.clone(), "--conv".into(), "cudnn".into()], "cudnn"),
        (vec!["--image".into(), image.clone(), "--attention".into(), "flash".into()], "flash"),
        (vec!["--image".into(), image.clone(), "--conv".into(), "winograd".into()], "--conv"),
        (
            vec![
                "--image".into(),
                image.clone(),
                "--init-latents".into(),
                fixtures().join("images/a.png").display().to_string(),
            ],
            "--init-latents",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> =
            vec!["--model".into(), model.clone(), "--instruction".into(), "x".into(), "--output".into(), out.clone()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = edit(&refs);
        assert_eq!(code, 2, "{refs:?}\n{stdout}{stderr}");
        assert!(stderr.contains(needle), "{refs:?}: {stderr}");
        assert!(!std::path::Path::new(&out).exists(), "no output on failure");
    }
    let (code, _, stderr) = edit(&[
        "--model",
        &model,
        "--image",
        &image,
        "--instruction",
        "x",
        "--output",
        &dir.join("o.gif").display().to_string(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().filter(|l| l.starts_with("error:")).count(), 1, "{stderr}");
    let (code, _, stderr) = edit(&[
        "--model",
        &dir.join("nowhere").display().to_string(),
        "--image",
        &image,
        "--instruction",
        "x",
        "--output",
        &out,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("model_index.json"), "{stderr}");

    // Inputs are checked before the model loads: with no model at all, the bad image and the
    // missing output folder are what the command reports.
    let nowhere = dir.join("nowhere").display().to_string();
    let not_image = not_image.display().to_string();
    let (code, _, stderr) = edit(&["--model", &nowhere, "--image", &not_image, "--instruction", "x", "--output", &out]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a valid image") && !stderr.contains("model_index.json"), "{stderr}");
    let in_missing_folder = dir.join("no/such/folder/o.png").display().to_string();
    let (code, _, stderr) =
        edit(&["--model", &nowhere, "--image", &image, "--instruction", "x", "--output", &in_missing_folder]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("does not exist") && !stderr.contains("model_index.json"), "{stderr}");
}

/// Lays out a Hugging Face hub cache for `owner/name` at `revision` holding the tiny
/// checkpoint, as `huggingface_hub` would (blobs, a snapshot of symlinks, a ref).
fn hf_cache(home: &Path, repo: &str, revision: &str) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let root = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("refs")).expect("refs");
    std::fs::write(root.join("refs").join(revision), commit).expect("ref");
    let snapshot = root.join("snapshots").join(commit);
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let model = tiny_model();
    for entry in walk(&model) {
        let relative = entry.strip_prefix(&model).expect("relative");
        if relative.to_string_lossy().contains(".fp16.") {
            continue;
        }
        let blob = blobs.join(relative.to_string_lossy().replace('/', "_"));
        std::fs::copy(&entry, &blob).expect("blob");
        let link = snapshot.join(relative);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("snapshot dir");
        std::os::unix::fs::symlink(&blob, &link).expect("symlink");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[test]
fn hub_models_load_from_the_cache_offline() {
    let tmp = temp_dir("hfhome");
    let home = tmp.path();
    hf_cache(home, "retouch-test/tiny-ip2p", "main");
    let out = home.join("out.png");
    let image = fixtures().join("images/a.png").display().to_string();
    let run = |model: &str, out: &Path| {
        let mut cmd = Command::new(retouch_bin());
        cmd.arg("edit").env("HF_HOME", home).env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "warn");
        run_cli(
            cmd,
            &[
                "--model",
                model,
                "--image",
                &image,
                "--instruction",
                "make it snowy",
                "--output",
                &out.display().to_string(),
                "--seed",
                "0",
                "--steps",
                "20",
            ],
        )
    };
    let (code, stdout, stderr) = run("hf:retouch-test/tiny-ip2p", &out);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(max_diff(&out, &fixtures().join("golden/ea_default_0.png")) <= 2);
    // A revision missing from the cache is a clear failure, not a download attempt.
    let (code, _, stderr) = run("hf:retouch-test/tiny-ip2p@v2", &home.join("other.png"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE") && stderr.contains("not in the Hub cache"), "{stderr}");
}

#[test]
fn a_worker_loads_its_model_from_s3() {
    let env = Env::get();
    let name = unique("s3model");
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs", "models"]);
    let model = tiny_model();
    for file in walk(&model) {
        let key = format!("tiny/{}", file.strip_prefix(&model).expect("relative").display());
        s3.put("models", &key, &std::fs::read(&file).expect("model file"));
    }
    s3.put("inputs", "a.png", &test_png(5));
    let mut broker = Broker::new(&env.amqp_url, &name, 3);
    let cache_tmp = temp_dir("modelcache");
    let cache = cache_tmp.path();
    let cache_dir = cache.display().to_string();
    let mut worker = Worker::start(
        &name,
        &broker.worker_env(3),
        &s3,
        &[
            ("RETOUCH_MODEL_SOURCE", "s3://models/tiny/"),
            ("RETOUCH_MODEL_CACHE_DIR", cache_dir.as_str()),
            ("RETOUCH_S3_OPERATION_TIMEOUT", "30s"),
        ],
    );
    worker.wait_ready();
    assert!(cache.join("models/tiny/unet/diffusion_pytorch_model.safetensors").is_file(), "synced into the cache");
    broker.publish_json(
        &json!({"job_id": "from-s3-model", "source": "s3://inputs/a.png", "instruction": "x", "params": {"steps": 2}}),
    );
    let results = broker.results_until(Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(results["from-s3-model"].status, Status::Succeeded);
    assert!(results["from-s3-model"].model.starts_with("s3://models/tiny"), "{:?}", results["from-s3-model"].model);

    // `retouch batch` loads the same s3:// model through the same loader (RETOUCH_S3_* for the
    // store), into its own cache folder.
    let batch_tmp = temp_dir("s3model-batch");
    let (inputs, outputs, batch_cache) =
        (batch_tmp.path().join("in"), batch_tmp.path().join("out"), batch_tmp.path().join("cache"));
    std::fs::create_dir_all(&inputs).expect("inputs");
    std::fs::write(inputs.join("a.png"), test_png(5)).expect("input");
    let mut cmd = command(&name, &[], &s3, &[("RUST_LOG", "warn")]);
    cmd.arg("batch");
    let args = [
        "--model",
        "s3://models/tiny/",
        "--model-cache-dir",
        batch_cache.to_str().expect("utf-8"),
        "--input-dir",
        inputs.to_str().expect("utf-8"),
        "--instruction",
        "x",
        "--steps",
        "2",
        "--output-dir",
        outputs.to_str().expect("utf-8"),
    ];
    let (code, stdout, stderr) = run_cli(cmd, &args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(outputs.join("a.png").is_file(), "{stdout}{stderr}");
    assert!(batch_cache.join("models/tiny/unet/config.json").is_file(), "mirrored into --model-cache-dir");
}

/// `retouch fetch-model` as the chart's init container runs it (helm/retouch/templates/
/// deployment.yaml: only `--config`), the model and its cache set through the environment as an
/// `extraEnv` would set them for the worker: it prints the checkpoint's directory. The old
/// `--cache-dir` flag name still works.
#[test]
fn fetch_model_takes_the_init_containers_arguments() {
    let tmp = temp_dir("fetchmodel");
    let cache = tmp.path().display().to_string();
    let model = tiny_model().display().to_string();
    let config = workspace().join("config/worker.toml").display().to_string();
    /// Environment variables and arguments of one run.
    type Run<'a> = (&'a [(&'a str, &'a str)], Vec<&'a str>);
    let runs: [Run; 2] = [
        (
            &[("RETOUCH_MODEL_SOURCE", model.as_str()), ("RETOUCH_MODEL_CACHE_DIR", cache.as_str())],
            vec!["fetch-model", "--config", &config],
        ),
        (&[], vec!["fetch-model", "--model", &model, "--cache-dir", &cache, "--config", &config]),
    ];
    for (env, args) in runs {
        let mut cmd = Command::new(retouch_bin());
        cmd.env("RUST_LOG", "warn").env_remove("RETOUCH_MODEL_SOURCE").envs(env.iter().copied());
        let (code, stdout, stderr) = run_cli(cmd, &args);
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        assert_eq!(stdout.trim(), model, "{args:?}: {stderr}");
    }
}
