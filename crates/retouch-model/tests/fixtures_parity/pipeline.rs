//! Whole edits against diffusers' outputs: every case within 2/255 on every pixel, and batch
//! results identical to single-image results.

use std::collections::HashMap;
use std::path::Path;

use image::RgbImage;
use retouch_core::editor::{EditBatch, EditObserver, EditRequest, NoProgress};
use retouch_core::imaging::{self, DecodeLimits};
use retouch_core::params::SchedulerKind;
use retouch_model::{InstructPix2Pix, LoadOptions};
use serde_json::Value;

use crate::{fixtures, read_json};

/// The acceptance bound: |Δ| per uint8 channel value.
const TOLERANCE: u8 = 2;

pub(crate) fn load(model: &str, variant: Option<&str>) -> InstructPix2Pix {
    let options = LoadOptions { variant: variant.map(str::to_string), ..Default::default() };
    InstructPix2Pix::load(&fixtures().join(model), model, &options).unwrap_or_else(|e| panic!("{model}: {e}"))
}

pub(crate) fn prepared(path: &str, max_side: u32) -> RgbImage {
    let bytes = std::fs::read(fixtures().join(path)).expect("input image");
    imaging::prepare(&bytes, DecodeLimits::default(), max_side, 8).expect("prepare").image
}

fn init_latents(path: &str) -> Vec<f32> {
    let tensors =
        candle_core::safetensors::load(fixtures().join(path), &candle_core::Device::Cpu).expect("latents file");
    tensors["latents"].flatten_all().and_then(|t| t.to_vec1()).expect("f32 latents")
}

pub(crate) fn batch_for(case: &Value) -> EditBatch {
    let max_side = case["max_side"].as_u64().expect("max_side") as u32;
    let strings = |key: &str| -> Vec<String> {
        case[key].as_array().expect(key).iter().map(|v| v.as_str().expect("string").to_string()).collect()
    };
    let images = strings("images");
    let instructions = strings("instructions");
    let seeds: Vec<u64> = case["seeds"].as_array().expect("seeds").iter().map(|v| v.as_u64().expect("seed")).collect();
    let latents = case["init_latents"].as_str().map(init_latents);
    // Absent from cases written before negative prompts and Karras sigmas existed.
    let negatives: Vec<Option<String>> = match case.get("negative_prompts").and_then(Value::as_array) {
        Some(list) => list.iter().map(|v| v.as_str().map(str::to_string)).collect(),
        None => vec![None; images.len()],
    };
    EditBatch {
        steps: case["steps"].as_u64().expect("steps") as u32,
        scheduler: Some(case["scheduler"].as_str().expect("scheduler").parse::<SchedulerKind>().expect("kind")),
        karras_sigmas: case.get("karras_sigmas").and_then(Value::as_bool),
        requests: images
            .iter()
            .zip(&instructions)
            .zip(&seeds)
            .zip(negatives)
            .map(|(((image, instruction), &seed), negative_prompt)| EditRequest {
                image: prepared(image, max_side),
                instruction: instruction.clone(),
                negative_prompt,
                seed,
                guidance_scale: case["guidance_scale"].as_f64().expect("gs") as f32,
                image_guidance_scale: case["image_guidance_scale"].as_f64().expect("igs") as f32,
                init_latents: latents.clone(),
            })
            .collect(),
    }
}

pub(crate) fn max_and_mean_diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "output size");
    let diffs: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    (diffs.iter().copied().max().unwrap_or(0), mean)
}

pub(crate) fn run_case(
    model: &InstructPix2Pix,
    case: &Value,
    batch: &EditBatch,
) -> Vec<retouch_core::editor::EditedImage> {
    let mut config = model.scheduler_config().clone();
    for (k, v) in case["scheduler_overrides"].as_object().expect("overrides") {
        config.insert(k.clone(), v.clone());
    }
    model.run_with_scheduler_config(batch, &config, &mut NoProgress).expect("edit runs")
}

#[test]
fn every_case_is_within_two_levels_of_diffusers() {
    let data = read_json("cases.json");
    let cases = data["cases"].as_array().expect("cases");
    let mut models: HashMap<(String, Option<String>), InstructPix2Pix> = HashMap::new();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut worst = (0u8, String::new());
    let mut worst_per_scheduler: std::collections::BTreeMap<String, (u8, String)> = Default::default();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let key = (case["model"].as_str().expect("model").to_string(), case["variant"].as_str().map(str::to_string));
        let model = models.entry(key.clone()).or_insert_with(|| load(&key.0, key.1.as_deref()));
        let batch = batch_for(case);
        let outputs = run_case(model, case, &batch);
        for (i, (out, expected)) in outputs.iter().zip(case["expected"].as_array().expect("expected")).enumerate() {
            let golden = image::open(fixtures().join(expected.as_str().expect("path"))).expect("golden png").to_rgb8();
            let (max, mean) = max_and_mean_diff(&out.image, &golden);
            let truncated = case["truncated"][i].as_bool().expect("truncated");
            report.push(format!(
                "{name:>20}[{i}] {:>3}×{:<3} max |Δ| {max}  mean |Δ| {mean:.5}",
                golden.width(),
                golden.height()
            ));
            if max > TOLERANCE || out.instruction_truncated != truncated {
                failures.push(format!(
                    "{name}[{i}]: max |Δ| {max} (truncated {} vs {truncated})",
                    out.instruction_truncated
                ));
            }
            if max >= worst.0 {
                worst = (max, format!("{name}[{i}]"));
            }
            let karras = if case.get("karras_sigmas").and_then(Value::as_bool) == Some(true) { " karras" } else { "" };
            let scheduler = format!("{}{karras}", case["scheduler"].as_str().expect("scheduler"));
            let entry = worst_per_scheduler.entry(scheduler).or_insert((0, String::new()));
            if max >= entry.0 {
                *entry = (max, format!("{name}[{i}]"));
            }
        }
    }
    eprintln!("{}\nworst: {} at {}", report.join("\n"), worst.0, worst.1);
    eprintln!("worst |Δ| per scheduler:");
    for (scheduler, (max, case)) in &worst_per_scheduler {
        eprintln!("{scheduler:>24} {max} ({case})");
    }
    assert!(cases.len() >= 45, "expected the full case list, found {}", cases.len());
    assert!(failures.is_empty(), "cases beyond {TOLERANCE}/255:\n{}", failures.join("\n"));
}

fn run_alone(model: &InstructPix2Pix, batch: &EditBatch, request: &EditRequest) -> RgbImage {
    let single = EditBatch {
        steps: batch.steps,
        scheduler: batch.scheduler,
        karras_sigmas: batch.karras_sigmas,
        requests: vec![request.clone()],
    };
    model.run(&single, &mut NoProgress).expect("single edit").remove(0).image
}

/// A synthetic image whose lowest UNet level is a single token at 64 px (the shape where
/// gemm switches kernels with the row count).
pub(crate) fn synthetic(size: u32, salt: u8) -> RgbImage {
    RgbImage::from_fn(size, size, |x, y| {
        let inside = (x as i32 - 32).pow(2) + (y as i32 - 28).pow(2) < 300;
        if inside { image::Rgb([230, 40 + salt, 40]) } else { image::Rgb([(x * 4) as u8, (y * 3) as u8 ^ salt, 120]) }
    })
}

pub(crate) fn assert_batch_equals_single(
    model: &InstructPix2Pix,
    images: &[RgbImage],
    steps: u32,
    scheduler: SchedulerKind,
    karras_sigmas: Option<bool>,
) {
    let request =
        |image: &RgbImage, instruction: &str, negative: Option<&str>, seed: u64, gs: f32, igs: f32| EditRequest {
            image: image.clone(),
            instruction: instruction.into(),
            negative_prompt: negative.map(str::to_string),
            seed,
            guidance_scale: gs,
            image_guidance_scale: igs,
            init_latents: None,
        };
    // Mixed instructions, negative prompts, seeds and guidance, including one image with
    // guidance off (one UNet row instead of three) in the middle of the batch, the same request
    // twice, and the first request again with another negative prompt.
    let batch = EditBatch {
        steps,
        scheduler: Some(scheduler),
        karras_sigmas,
        requests: vec![
            request(&images[0], "make it snowy", Some("blurry"), 1, 7.5, 1.5),
            request(&images[1], "turn the sofa red", Some("unused without guidance"), 2, 1.0, 1.5),
            request(&images[2], "add fireworks", None, 3, 4.0, 1.2),
            request(&images[0], "make it snowy", Some("blurry"), 1, 7.5, 1.5),
            request(&images[0], "make it snowy", Some("dark, gloomy"), 1, 7.5, 1.5),
        ],
    };
    let what = format!("{scheduler} karras {karras_sigmas:?}");
    let batched = model.run(&batch, &mut NoProgress).expect("batch edit");
    for (i, request) in batch.requests.iter().enumerate() {
        let alone = run_alone(model, &batch, request);
        let (max, _) = max_and_mean_diff(&batched[i].image, &alone);
        assert!(batched[i].image == alone, "{what}: image {i}: batched differs from alone (max |Δ| {max})");
    }
    assert!(batched[0].image == batched[3].image, "{what}: the same request twice in one batch must agree");
    let (max, _) = max_and_mean_diff(&batched[0].image, &batched[4].image);
    assert!(max > 2, "{what}: the negative prompt must change a guided edit (max |Δ| {max})");
}

#[test]
fn batched_results_equal_single_results_bit_for_bit() {
    let model = load("models/tiny-sd15", None);
    let fixtures = [prepared("images/a.png", 512), prepared("images/b.png", 512), prepared("images/c.png", 512)];
    for (scheduler, karras) in [
        (SchedulerKind::EulerAncestral, None),
        (SchedulerKind::Euler, Some(true)),
        (SchedulerKind::Ddim, None),
        (SchedulerKind::DpmppTwoM, Some(true)),
        (SchedulerKind::DpmppTwoMSde, None),
        (SchedulerKind::Unipc, Some(true)),
    ] {
        assert_batch_equals_single(&model, &fixtures, 6, scheduler, karras);
    }
    let synthetic64 = [synthetic(64, 0), synthetic(64, 17), synthetic(64, 34)];
    assert_batch_equals_single(&model, &synthetic64, 6, SchedulerKind::EulerAncestral, None);
    assert_batch_equals_single(&model, &synthetic64, 5, SchedulerKind::DpmppTwoMSde, Some(true));
    let model_b = load("models/tiny-sd15-b", None);
    let synthetic128 = [synthetic(128, 0), synthetic(128, 17), synthetic(128, 34)];
    assert_batch_equals_single(&model_b, &synthetic128, 4, SchedulerKind::EulerAncestral, None);
    assert_batch_equals_single(&model_b, &synthetic128, 4, SchedulerKind::Unipc, None);
}

#[test]
fn fp16_variant_and_missing_variant() {
    let dir = fixtures().join("models/tiny-sd15");
    let options = LoadOptions { variant: Some("int4".into()), ..Default::default() };
    let err = InstructPix2Pix::load(Path::new(&dir), "tiny", &options).expect_err("no int4 files");
    assert!(err.to_string().contains("int4"), "{err}");
}

/// Drops the images named, before the step given (`total` = before decoding), and records
/// the steps it saw.
struct DropAt {
    /// (request index, drop before this step — counted from 0).
    drops: Vec<(usize, usize)>,
    /// Steps completed so far.
    step: usize,
}

impl EditObserver for DropAt {
    fn on_step(&mut self, step: usize, _total: usize, _elapsed: std::time::Duration) {
        self.step = step;
    }

    fn drop_image(&mut self, index: usize) -> bool {
        self.drops.iter().any(|&(i, at)| i == index && self.step >= at)
    }
}

#[test]
fn images_dropped_mid_batch_leave_their_batch_mates_bit_identical() {
    let model = load("models/tiny-sd15", None);
    let images = [synthetic(64, 0), synthetic(64, 17), synthetic(64, 34), synthetic(64, 51)];
    let request = |i: usize, gs: f32| EditRequest {
        image: images[i].clone(),
        instruction: format!("edit number {i}"),
        negative_prompt: None,
        seed: 10 + i as u64,
        guidance_scale: gs,
        image_guidance_scale: 1.5,
        init_latents: None,
    };
    // A multistep solver (its state must shrink with the batch) and an ancestral one (its
    // per-image noise generators must stay in step).
    for scheduler in [SchedulerKind::Unipc, SchedulerKind::DpmppTwoMSde, SchedulerKind::EulerAncestral] {
        let batch = EditBatch {
            steps: 6,
            scheduler: Some(scheduler),
            karras_sigmas: None,
            requests: vec![request(0, 7.5), request(1, 1.0), request(2, 4.0), request(3, 7.5)],
        };
        // Image 1 (unguided, one UNet row) leaves before step 3, image 3 before decoding.
        let mut observer = DropAt { drops: vec![(1, 3), (3, 6)], step: 0 };
        let kept = model.run(&batch, &mut observer).expect("batch with drops");
        assert_eq!(kept.len(), 2, "{scheduler}: one result per image not dropped");
        for (result, i) in kept.iter().zip([0, 2]) {
            let alone = run_alone(&model, &batch, &batch.requests[i]);
            let (max, _) = max_and_mean_diff(&result.image, &alone);
            assert!(result.image == alone, "{scheduler}: image {i} differs from its solo run (max |Δ| {max})");
        }
        let mut all = DropAt { drops: vec![(0, 2), (1, 2), (2, 2), (3, 2)], step: 0 };
        assert!(model.run(&batch, &mut all).expect("all dropped").is_empty(), "{scheduler}");
        assert_eq!(all.step, 2, "{scheduler}: no step runs once every image is dropped");
    }
}
