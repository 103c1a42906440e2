//! The safety checker against transformers and diffusers (`safety_cases.json`,
//! `models/tiny-sd15-safety`): the CLIP preprocessing bit for bit, the decision (3-decimal
//! rounding, special-care adjustment) exactly, the checker's cosines and verdicts on the very
//! images diffusers checked, and whole edits — flagged ones black, the others within 2/255.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use retouch_core::editor::{EditBatch, EditRequest, NoProgress};
use retouch_core::imaging::{self, DecodeLimits};
use retouch_core::safety::SafetyPolicy;
use retouch_model::safety::{ImageProcessor, SafetyChecker, decide};
use retouch_model::{InstructPix2Pix, LoadOptions, ModelError};
use serde_json::Value;
use tempfile::TempDir;

use crate::{fixtures, floats, read_json};

const MODEL: &str = "models/tiny-sd15-safety";

/// The linear layers the pipeline gives the checker on this CPU (oneDNN f32 where installed).
fn cpu_clip_linear() -> retouch_model::kernels::LinearBackend {
    retouch_model::KernelChoice::default().resolve(&Device::Cpu, DType::F32).expect("kernels").clip_linear()
}

fn processor() -> ImageProcessor {
    let path = fixtures().join(MODEL).join("feature_extractor/preprocessor_config.json");
    let map = serde_json::from_str(&std::fs::read_to_string(path).expect("config")).expect("json");
    ImageProcessor::from_json(&map).expect("processor")
}

/// `pattern(w, h)` of generate.py: gradients, a 7×5 checkerboard and an (x·y) % 61 texture.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let r = x * 255 / (w - 1).max(1);
        let g = y * 255 / (h - 1).max(1);
        let b = ((x / 7 + y / 5) % 2) * 160 + (x * y) % 61;
        image::Rgb([r as u8, g as u8, b as u8])
    })
}

fn png(path: &str) -> RgbImage {
    image::open(fixtures().join(path)).unwrap_or_else(|e| panic!("{path}: {e}")).to_rgb8()
}

#[test]
fn preprocessing_is_bit_exact_with_transformers_pixel_values() {
    let data = read_json("safety_cases.json");
    let reference = &data["preprocess"];
    let p = processor();
    let levels: Vec<Vec<f32>> = reference["levels"].as_array().expect("levels").iter().map(floats).collect();
    for (c, channel) in levels.iter().enumerate() {
        for v in 0..=255u8 {
            assert_eq!(p.level(c, v).to_bits(), channel[usize::from(v)].to_bits(), "channel {c} level {v}");
        }
    }
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6, "several sizes and aspects");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let input = match &case["source"] {
            Value::String(path) => png(path),
            pattern_size => {
                let size = &pattern_size["pattern"];
                pattern(size[0].as_u64().expect("w") as u32, size[1].as_u64().expect("h") as u32)
            }
        };
        let resized: Vec<usize> =
            case["resized"].as_array().expect("resized").iter().map(|v| v.as_u64().expect("side") as usize).collect();
        assert_eq!(p.resized_size(input.width() as usize, input.height() as usize), (resized[0], resized[1]), "{name}");
        let expected = png(case["crop"].as_str().expect("crop"));
        let got = p.resize_and_crop(&input).expect("preprocess");
        let differing = got.as_raw().iter().zip(expected.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} uint8 values differ from transformers' resize + crop");
        // pixel_values = levels[crop], which generate.py asserts equals transformers' tensor.
        let (values, h, w) = p.pixel_values(&input).expect("pixel values");
        assert_eq!((h, w), (224, 224));
        let plane = h * w;
        for (i, v) in values.iter().enumerate() {
            let (c, pixel) = (i / plane, i % plane);
            let level = expected.as_raw()[pixel * 3 + c];
            assert_eq!(v.to_bits(), levels[c][usize::from(level)].to_bits(), "{name} value {i}");
        }
    }
}

#[test]
fn decisions_match_diffusers_including_rounding_and_the_special_care_adjustment() {
    let data = read_json("safety_cases.json");
    let decisions = &data["decisions"];
    let (special_thr, concept_thr) =
        (floats(&decisions["special_thresholds"]), floats(&decisions["concept_thresholds"]));
    let indices = |v: &Value| -> Vec<usize> {
        v.as_array().expect("indices").iter().map(|i| i.as_u64().expect("index") as usize).collect()
    };
    let cases = decisions["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let r = decide(&floats(&case["special_cos"]), &special_thr, &floats(&case["concept_cos"]), &concept_thr);
        assert_eq!(r.special_scores, floats(&case["special_scores"]), "{name}");
        assert_eq!(r.concept_scores, floats(&case["concept_scores"]), "{name}");
        assert_eq!(r.special_care, indices(&case["special_care"]), "{name}");
        assert_eq!(r.bad_concepts, indices(&case["bad_concepts"]), "{name}");
        assert_eq!(r.nsfw, case["has_nsfw"].as_bool().expect("has_nsfw"), "{name}");
    }
    // The boundary cases the fixture was built around.
    let by_name: HashMap<&str, &Value> = cases.iter().map(|c| (c["name"].as_str().expect("name"), c)).collect();
    assert_eq!(by_name["raw_0.0004_rounds_to_0"]["has_nsfw"], false);
    assert_eq!(by_name["special_hit_then_concept_-0.009_flags"]["has_nsfw"], true);
    assert_eq!(by_name["special_hit_then_concept_-0.0104_does_not"]["has_nsfw"], false);
}

fn checker() -> SafetyChecker {
    SafetyChecker::load(&fixtures().join(MODEL), None, DType::F32, &Device::Cpu, cpu_clip_linear())
        .expect("checker loads")
}

/// The checker's cosines, scores and verdicts on exactly the images diffusers' feature
/// extractor received (`safety/inputs/*.png`), so even the near-threshold case is exact.
#[test]
fn the_checker_matches_diffusers_on_the_images_it_checked() {
    let data = read_json("safety_cases.json");
    let checker = checker();
    let (special_thr, concept_thr) = checker.thresholds();
    assert_eq!(special_thr, floats(&data["thresholds"]["special"]).as_slice());
    assert_eq!(concept_thr, floats(&data["thresholds"]["concept"]).as_slice());
    let mut worst = 0f32;
    let mut verdicts = Vec::new();
    for case in data["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        for (i, want) in case["checker"].as_array().expect("checker").iter().enumerate() {
            let input = png(want["checker_input"].as_str().expect("input"));
            let r = checker.check(&input).expect("check");
            for (got, want) in
                [(&r.special_cos, floats(&want["special_cos"])), (&r.concept_cos, floats(&want["concept_cos"]))]
            {
                assert_eq!(got.len(), want.len(), "{name}[{i}]: cosine count");
                for (g, w) in got.iter().zip(&want) {
                    worst = worst.max((g - w).abs());
                }
            }
            assert_eq!(r.special_scores, floats(&want["special_scores"]), "{name}[{i}]");
            assert_eq!(r.concept_scores, floats(&want["concept_scores"]), "{name}[{i}]");
            assert_eq!(r.nsfw, want["has_nsfw"].as_bool().expect("has_nsfw"), "{name}[{i}]");
            verdicts.push((name.to_string(), r.nsfw));
        }
    }
    assert!(worst < 1e-5, "cosines within 1e-5 of diffusers (worst {worst:e})");
    assert!(verdicts.iter().any(|v| v.1) && verdicts.iter().any(|v| !v.1), "{verdicts:?}");
}

fn prepared(path: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join(path)).expect("input image");
    imaging::prepare(&bytes, DecodeLimits::default(), 512, 8).expect("prepare").image
}

fn batch_for(case: &Value) -> EditBatch {
    let list = |key: &str| case[key].as_array().expect(key).clone();
    EditBatch {
        steps: case["steps"].as_u64().expect("steps") as u32,
        scheduler: Some(case["scheduler"].as_str().expect("scheduler").parse().expect("kind")),
        karras_sigmas: None,
        requests: list("images")
            .iter()
            .zip(list("instructions"))
            .zip(list("seeds"))
            .map(|((image, instruction), seed)| EditRequest {
                image: prepared(image.as_str().expect("path")),
                instruction: instruction.as_str().expect("instruction").to_string(),
                negative_prompt: None,
                seed: seed.as_u64().expect("seed"),
                guidance_scale: case["guidance_scale"].as_f64().expect("gs") as f32,
                image_guidance_scale: case["image_guidance_scale"].as_f64().expect("igs") as f32,
                init_latents: None,
            })
            .collect(),
    }
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn load(policy: SafetyPolicy) -> Result<InstructPix2Pix, ModelError> {
    InstructPix2Pix::load(&fixtures().join(MODEL), MODEL, &LoadOptions { safety_checker: policy, ..Default::default() })
}

#[test]
fn edits_are_flagged_black_exactly_where_diffusers_flags_them() {
    // model_index.json says requires_safety_checker: false, like timbrooks/instruct-pix2pix;
    // diffusers loads and runs the checker anyway, and so does `auto`.
    let model = load(SafetyPolicy::Auto).expect("model loads");
    assert!(model.safety_checker().is_some(), "auto runs the checker the checkpoint names");
    let data = read_json("safety_cases.json");
    let mut report = Vec::new();
    let (mut black, mut clear) = (0, 0);
    for case in data["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let outputs = model.run(&batch_for(case), &mut NoProgress).expect("edit");
        assert_eq!(outputs.len(), case["images"].as_array().expect("images").len(), "{name}: one output per image");
        for (i, out) in outputs.iter().enumerate() {
            let flagged = case["nsfw_content_detected"][i].as_bool().expect("flag");
            assert_eq!(out.nsfw_content_detected, Some(flagged), "{name}[{i}]");
            let golden = png(case["expected"][i].as_str().expect("golden"));
            if flagged {
                assert!(out.image.as_raw().iter().all(|&v| v == 0), "{name}[{i}]: a flagged image is black");
                assert_eq!(out.image, golden, "{name}[{i}]: diffusers' output is black too");
                black += 1;
            } else {
                let d = max_diff(&out.image, &golden);
                report.push(format!("{name}[{i}] max |Δ| {d}"));
                clear += 1;
                assert!(d <= 2, "{name}[{i}]: max |Δ| {d} > 2");
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(black >= 1 && clear >= 1, "the cases cover flagged ({black}) and clear ({clear}) outputs");
}

#[test]
fn off_skips_the_checker_and_on_requires_one() {
    let data = read_json("safety_cases.json");
    let case = data["cases"].as_array().expect("cases").iter().find(|c| c["name"] == "safety_flagged").expect("case");
    let model = load(SafetyPolicy::Off).expect("model loads");
    assert!(model.safety_checker().is_none());
    let out = &model.run(&batch_for(case), &mut NoProgress).expect("edit")[0];
    assert_eq!(out.nsfw_content_detected, None);
    let unchecked = png(case["checker"][0]["checker_input"].as_str().expect("input"));
    assert!(max_diff(&out.image, &unchecked) <= 2, "off gives the image the checker would have flagged");

    for policy in [SafetyPolicy::On, SafetyPolicy::Block] {
        let e = InstructPix2Pix::load(
            &fixtures().join("models/tiny-sd15"),
            "tiny",
            &LoadOptions { safety_checker: policy, ..Default::default() },
        )
        .expect_err("no checker in tiny-sd15");
        assert!(matches!(e, ModelError::SafetyChecker(_)), "{e}");
        assert!(e.to_string().contains(policy.as_str()), "{e}");
    }
    let plain = InstructPix2Pix::load(&fixtures().join("models/tiny-sd15"), "tiny", &LoadOptions::default())
        .expect("auto without a checker");
    assert!(plain.safety_checker().is_none());
}

/// A copy of the fixture checkpoint's checker with its tensors renamed by `rename`.
fn renamed_checker(tag: &str, rename: impl Fn(&str) -> Option<String>, extra: &[(&str, Tensor)]) -> TempDir {
    let src = fixtures().join(MODEL);
    let tmp = tempfile::Builder::new().prefix(&format!("retouch-safety-{tag}-")).tempdir().expect("temp dir");
    let dir = tmp.path();
    for sub in ["safety_checker", "feature_extractor"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    std::fs::copy(src.join("safety_checker/config.json"), dir.join("safety_checker/config.json")).expect("config");
    std::fs::copy(
        src.join("feature_extractor/preprocessor_config.json"),
        dir.join("feature_extractor/preprocessor_config.json"),
    )
    .expect("preprocessor");
    let tensors = candle_core::safetensors::load(src.join("safety_checker/model.safetensors"), &Device::Cpu)
        .expect("checker weights");
    let mut out: HashMap<String, Tensor> =
        tensors.into_iter().filter_map(|(k, v)| rename(&k).map(|k| (k, v))).collect();
    for (name, t) in extra {
        out.insert((*name).to_string(), t.clone());
    }
    candle_core::safetensors::save(&out, dir.join("safety_checker/model.safetensors")).expect("save");
    tmp
}

fn cosines(dir: &Path) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let checker = SafetyChecker::load(dir, None, DType::F32, &Device::Cpu, cpu_clip_linear())?;
    let (values, h, w) = checker.processor().pixel_values(&png("safety/inputs/safety_flagged_0.png"))?;
    checker.cosines(&values, (h, w))
}

#[test]
fn tower_names_of_old_and_new_transformers_both_load_and_every_tensor_is_used() {
    let reference = cosines(&fixtures().join(MODEL)).expect("real layout");
    // transformers 5 writes the tower as `vision_model.*`.
    let flat = renamed_checker("flat", |k| Some(k.replacen("vision_model.vision_model.", "vision_model.", 1)), &[]);
    assert_eq!(cosines(flat.path()).expect("transformers 5 names"), reference);
    // Older files carry the position_ids buffer: allowed to stay unused.
    let ids = Tensor::arange(0i64, 257, &Device::Cpu).expect("ids").unsqueeze(0).expect("ids");
    let buffer =
        renamed_checker("ids", |k| Some(k.to_string()), &[("vision_model.vision_model.embeddings.position_ids", ids)]);
    assert_eq!(cosines(buffer.path()).expect("with position_ids"), reference);
    // Anything else left over is an error naming it.
    let stray = Tensor::zeros(4, DType::F32, &Device::Cpu).expect("zeros");
    let extra = renamed_checker("extra", |k| Some(k.to_string()), &[("vision_model.vision_model.stray.weight", stray)]);
    let e = cosines(extra.path()).expect_err("unused tensor").to_string();
    assert!(e.contains("stray.weight") && e.contains("not used"), "{e}");
    // A missing class embedding is an error, never a random one.
    let missing = renamed_checker("missing", |k| (!k.ends_with("class_embedding")).then(|| k.to_string()), &[]);
    let e = cosines(missing.path()).expect_err("missing tensor").to_string();
    assert!(e.contains("class_embedding"), "{e}");
}
