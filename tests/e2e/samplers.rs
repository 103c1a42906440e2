//! The samplers, Karras sigmas and negative prompts of issue 12 through every entry point:
//! `retouch edit` against every new diffusers golden, a worker job over real RabbitMQ and S3,
//! and `retouch batch` from a manifest.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use retouch_core::error::ErrorKind;
use retouch_core::job::Status;
use retouch_e2e::{
    Broker, Env, S3Server, Worker, fixtures, max_diff, open_rgb, retouch_bin, run_cli, temp_dir, tiny_model, unique,
};
use serde_json::{Value, json};

/// diffusers' acceptance bound per uint8 channel value.
const TOLERANCE: u8 = 2;

fn max_diff_golden(output: &Path, golden: &str) -> u8 {
    max_diff(&open_rgb(output), &open_rgb(&fixtures().join(golden)))
}

/// The cases of `tests/fixtures/cases.json` that use a new scheduler, Karras sigmas or a
/// negative prompt.
fn new_cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    let data: Value = serde_json::from_str(&text).expect("json");
    data["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| {
            matches!(c["scheduler"].as_str(), Some("dpmpp-2m" | "dpmpp-2m-sde" | "unipc"))
                || c["karras_sigmas"].as_bool() == Some(true)
                || !c["negative_prompts"].is_null()
        })
        .cloned()
        .collect()
}

fn case<'a>(cases: &'a [Value], name: &str) -> &'a Value {
    cases.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("case {name} in cases.json"))
}

#[test]
fn retouch_edit_matches_diffusers_on_every_new_case() {
    let tmp = temp_dir("samplers-edit");
    let dir = tmp.path();
    let cases = new_cases();
    let mut report = Vec::new();
    let mut worst = 0;
    let mut images = 0;
    for c in &cases {
        let name = c["name"].as_str().expect("name");
        let n = c["images"].as_array().expect("images").len();
        // retouch edit takes one image; the batch cases' images each run alone (the parity test
        // shows batched == alone bit for bit).
        for i in 0..n {
            let out = dir.join(format!("{name}_{i}.png"));
            let mut args: Vec<String> = vec![
                "--model".into(),
                fixtures().join(c["model"].as_str().expect("model")).display().to_string(),
                "--image".into(),
                fixtures().join(c["images"][i].as_str().expect("image")).display().to_string(),
                "--instruction".into(),
                c["instructions"][i].as_str().expect("instruction").into(),
                "--output".into(),
                out.display().to_string(),
                "--seed".into(),
                c["seeds"][i].to_string(),
                "--steps".into(),
                c["steps"].to_string(),
                "--guidance-scale".into(),
                c["guidance_scale"].to_string(),
                "--image-guidance-scale".into(),
                c["image_guidance_scale"].to_string(),
                "--max-side".into(),
                c["max_side"].to_string(),
                "--scheduler".into(),
                c["scheduler"].as_str().expect("scheduler").into(),
            ];
            assert!(c["scheduler_overrides"].as_object().is_some_and(|o| o.is_empty()), "{name}: flags only");
            if c["karras_sigmas"].as_bool() == Some(true) {
                args.push("--karras-sigmas".into());
            }
            if let Some(negative) = c["negative_prompts"][i].as_str() {
                args.extend(["--negative-prompt".into(), negative.into()]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut cmd = Command::new(retouch_bin());
            cmd.arg("edit").env("RUST_LOG", "warn");
            let (code, stdout, stderr) = run_cli(cmd, &refs);
            assert_eq!(code, 0, "{name}[{i}]: {stdout}{stderr}");
            let karras = if c["karras_sigmas"].as_bool() == Some(true) { " with Karras sigmas" } else { "" };
            let sampler = format!("{}{karras}, seed", c["scheduler"].as_str().expect("scheduler"));
            assert!(stdout.contains(&sampler), "{name}: {stdout}");
            let golden = c["expected"][i].as_str().expect("golden");
            let max = max_diff_golden(&out, golden);
            report.push(format!("{name:>24}[{i}] max |Δ| {max}"));
            worst = worst.max(max);
            images += 1;
            assert!(max <= TOLERANCE, "{name}[{i}]: max |Δ| {max} against diffusers");
        }
    }
    eprintln!("retouch edit against diffusers:\n{}\nworst {worst}", report.join("\n"));
    assert!(images >= 18, "only {images} images compared");
    for scheduler in ["dpmpp-2m", "dpmpp-2m-sde", "unipc"] {
        assert!(cases.iter().any(|c| c["scheduler"] == scheduler), "no {scheduler} case");
    }
}

#[test]
fn karras_sigmas_and_negative_prompts_are_checked_before_loading() {
    let tmp = temp_dir("samplers-bad");
    let dir = tmp.path();
    let model = tiny_model().display().to_string();
    let image = fixtures().join("images/a.png").display().to_string();
    let out = dir.join("o.png").display().to_string();
    let long = "x".repeat(4097);
    for (extra, needle) in [
        (vec!["--scheduler", "euler-ancestral", "--karras-sigmas"], "EulerAncestralDiscreteScheduler"),
        (vec!["--scheduler", "ddim", "--karras-sigmas=true"], "DDIMScheduler"),
        (vec!["--karras-sigmas=maybe"], "--karras-sigmas"),
        (vec!["--negative-prompt", long.as_str()], "--negative-prompt"),
        (vec!["--scheduler", "dpm++"], "dpmpp-2m, dpmpp-2m-sde, unipc"),
    ] {
        let mut args = vec!["--model", &model, "--image", &image, "--instruction", "x", "--output", &out];
        args.extend(extra);
        let mut cmd = Command::new(retouch_bin());
        cmd.arg("edit").env("RUST_LOG", "warn");
        let (code, stdout, stderr) = run_cli(cmd, &args);
        assert_eq!(code, 2, "{args:?}\n{stdout}{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!Path::new(&out).exists(), "no output on failure");
    }
    // The checkpoint's default (Euler-ancestral) is only known once loaded: still a usage error.
    let mut cmd = Command::new(retouch_bin());
    cmd.arg("edit").env("RUST_LOG", "warn");
    let args = ["--model", &model, "--image", &image, "--instruction", "x", "--output", &out, "--karras-sigmas"];
    let (code, stdout, stderr) = run_cli(cmd, &args);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("use_karras_sigmas"), "{stderr}");
}

#[test]
fn a_worker_runs_new_samplers_karras_sigmas_and_negative_prompts() {
    let env = Env::get();
    let name = unique("samplers");
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for image in ["a.png", "b.png"] {
        s3.put("inputs", image, &std::fs::read(fixtures().join("images").join(image)).expect("fixture image"));
    }
    let mut broker = Broker::new(&env.amqp_url, &name, 3);
    let extra = [("RETOUCH_ENGINE_MAX_BATCH", "3"), ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "3s")];
    let mut worker = Worker::start(&name, &broker.worker_env(3), &s3, &extra);
    worker.wait_ready();
    let cases = new_cases();
    let job = |id: &str, case_name: &str| {
        let c = case(&cases, case_name);
        let image = c["images"][0].as_str().expect("image").trim_start_matches("images/");
        let mut params = json!({"steps": c["steps"], "seed": c["seeds"][0], "scheduler": c["scheduler"],
                                "guidance_scale": c["guidance_scale"], "image_guidance_scale": c["image_guidance_scale"]});
        if c["karras_sigmas"].as_bool() == Some(true) {
            params["karras_sigmas"] = json!(true);
        }
        if let Some(negative) = c["negative_prompts"][0].as_str() {
            params["negative_prompt"] = json!(negative);
        }
        json!({"job_id": id, "source": format!("s3://inputs/{image}"), "instruction": c["instructions"][0],
               "params": params})
    };
    // Two jobs with the same sampler settings but their own negative prompts and seeds share a
    // batch; a third with another sampler runs on its own; a fourth asks DDIM for Karras sigmas.
    broker.publish_json(&job("unipc-karras-negative", "negative_unipc_karras"));
    broker.publish_json(&json!({"job_id": "unipc-karras-companion", "source": "s3://inputs/b.png",
        "instruction": "make it golden", "params": {"steps": 10, "seed": 7, "scheduler": "unipc",
        "karras_sigmas": true, "negative_prompt": "blurry"}}));
    broker.publish_json(&job("sde-karras", "dpmpp_2m_sde_karras"));
    broker.publish_json(&json!({"job_id": "ddim-karras", "source": "s3://inputs/a.png", "instruction": "x",
        "params": {"scheduler": "ddim", "karras_sigmas": true}}));
    let results = broker.results_until(Duration::from_secs(120), |r| r.len() >= 4);
    let output = |id: &str| {
        let r = &results[id];
        assert_eq!(r.status, Status::Succeeded, "{id}: {r:?}");
        let url = r.output.as_deref().expect("output");
        let (bucket, key) = url.trim_start_matches("s3://").split_once('/').expect("s3 url");
        image::load_from_memory(&s3.get(bucket, key).expect("output object")).expect("decodes").to_rgb8()
    };
    for (id, case_name) in [("unipc-karras-negative", "negative_unipc_karras"), ("sde-karras", "dpmpp_2m_sde_karras")] {
        let golden = image::open(fixtures().join(format!("golden/{case_name}_0.png"))).expect("golden").to_rgb8();
        let max = max_diff(&output(id), &golden);
        eprintln!("worker {id}: max |Δ| {max} against diffusers ({case_name})");
        assert!(max <= TOLERANCE, "{id}: max |Δ| {max} against diffusers' {case_name}");
    }
    output("unipc-karras-companion");
    let refused = &results["ddim-karras"];
    assert_eq!(refused.status, Status::Failed);
    let error = refused.error.as_ref().expect("error");
    assert_eq!(error.kind, ErrorKind::InvalidJob);
    assert!(error.message.contains("karras_sigmas"), "{}", error.message);
    let (_, metrics) = worker.get("/metrics").expect("metrics");
    // unipc+karras (2 jobs) in one call, dpmpp-2m-sde+karras in another: 3 images, 2 calls.
    assert!(
        metrics.contains("retouch_batch_size_sum 3") && metrics.contains("retouch_batch_size_count 2"),
        "{metrics}"
    );
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn retouch_batch_takes_the_new_params_from_flags_and_manifest_rows() {
    let tmp = temp_dir("samplers-batch");
    let dir = tmp.path();
    let (input, output) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).expect("mkdir");
    std::fs::copy(fixtures().join("images/a.png"), input.join("a.png")).expect("copy");
    let cases = new_cases();
    let sde = case(&cases, "dpmpp_2m_sde_karras");
    let negative = case(&cases, "negative_unipc_karras");
    // Flags give dpmpp-2m-sde with Karras sigmas; the second row switches to unipc and adds a
    // negative prompt (Karras sigmas still from the flag).
    let rows = [
        json!({"source": "in/a.png", "output": "sde.png", "instruction": sde["instructions"][0],
               "params": {"seed": sde["seeds"][0]}}),
        json!({"source": "in/a.png", "output": "negative.png", "instruction": negative["instructions"][0],
               "params": {"seed": negative["seeds"][0], "scheduler": "unipc",
                          "negative_prompt": negative["negative_prompts"][0]}}),
    ];
    let manifest = dir.join("jobs.jsonl");
    std::fs::write(&manifest, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).expect("manifest");
    let mut cmd = Command::new(retouch_bin());
    cmd.arg("batch");
    let args = [
        "--model",
        &tiny_model().display().to_string(),
        "--manifest",
        &manifest.display().to_string(),
        "--output-dir",
        &output.display().to_string(),
        "--steps",
        "10",
        "--scheduler",
        "dpmpp-2m-sde",
        "--karras-sigmas",
    ]
    .map(str::to_string);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run_cli(cmd, &refs);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("2 images: 2 edited"), "{stdout}");
    for (file, c) in [("sde.png", sde), ("negative.png", negative)] {
        let max = max_diff_golden(&output.join(file), c["expected"][0].as_str().expect("golden"));
        eprintln!("retouch batch {file}: max |Δ| {max} against diffusers ({})", c["name"]);
        assert!(max <= TOLERANCE, "{file}: max |Δ| {max}");
    }
}
