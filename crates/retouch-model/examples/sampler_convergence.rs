//! Quality per step of every sampler on the committed tiny checkpoint: for 5–30 steps, the mean
//! |Δ| (uint8 levels, over every channel value of three 64×64 fixture edits) against a 50-step
//! Euler-ancestral edit of the same image and seed, and against the same sampler at 100 steps.
//!
//! `cargo run -p retouch-model --example sampler_convergence [-- --json out.json]`
//!
//! The checkpoint has random weights: this shows how the samplers converge, not how good the
//! real model's images are (docs/benchmarks.md).

use std::path::PathBuf;

use image::RgbImage;
use retouch_core::editor::{EditBatch, EditRequest, NoProgress};
use retouch_core::imaging::{self, DecodeLimits};
use retouch_model::scheduler::SchedulerKind;
use retouch_model::{InstructPix2Pix, LoadOptions};

/// The step counts of the table.
const STEPS: std::ops::RangeInclusive<u32> = 5..=30;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Mean |Δ| over every channel value of every image.
fn mean_abs_diff(a: &[RgbImage], b: &[RgbImage]) -> f64 {
    let (mut sum, mut n) = (0u64, 0u64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.as_raw().iter().zip(y.as_raw()) {
            sum += u64::from(p.abs_diff(*q));
            n += 1;
        }
    }
    sum as f64 / n as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json_out = std::env::args().skip_while(|a| a != "--json").nth(1);
    let model = InstructPix2Pix::load(&fixtures().join("models/tiny-sd15"), "tiny-sd15", &LoadOptions::default())?;
    let images: Vec<RgbImage> = ["a.png", "b.png", "c.png"]
        .iter()
        .map(|name| {
            let bytes = std::fs::read(fixtures().join("images").join(name))?;
            Ok(imaging::prepare(&bytes, DecodeLimits::default(), 512, 8)?.image)
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let run =
        |scheduler: SchedulerKind, karras: bool, steps: u32| -> Result<Vec<RgbImage>, Box<dyn std::error::Error>> {
            let batch = EditBatch {
                steps,
                scheduler: Some(scheduler),
                karras_sigmas: Some(karras),
                requests: images
                    .iter()
                    .enumerate()
                    .map(|(i, image)| EditRequest {
                        image: image.clone(),
                        instruction: "make it snowy".into(),
                        negative_prompt: None,
                        seed: i as u64,
                        guidance_scale: 7.5,
                        image_guidance_scale: 1.5,
                        init_latents: None,
                    })
                    .collect(),
            };
            Ok(model.run(&batch, &mut NoProgress)?.into_iter().map(|e| e.image).collect())
        };

    let reference = run(SchedulerKind::EulerAncestral, false, 50)?;
    let samplers: Vec<(SchedulerKind, bool)> = SchedulerKind::ALL
        .iter()
        .flat_map(|&k| if k.supports_karras_sigmas() { vec![(k, false), (k, true)] } else { vec![(k, false)] })
        .collect();
    let mut rows = Vec::new();
    for &(kind, karras) in &samplers {
        let own = run(kind, karras, 100)?;
        let mut to_ea = Vec::new();
        let mut to_own = Vec::new();
        for steps in STEPS {
            let out = run(kind, karras, steps)?;
            to_ea.push(mean_abs_diff(&out, &reference));
            to_own.push(mean_abs_diff(&out, &own));
        }
        let name = format!("{kind}{}", if karras { " + karras" } else { "" });
        eprintln!("{name}: done");
        rows.push((name, to_ea, to_own, mean_abs_diff(&own, &reference)));
    }

    let first_within = |values: &[f64], limit: f64| -> String {
        STEPS.zip(values).find(|(_, v)| **v <= limit).map_or("> 30".into(), |(s, _)| s.to_string())
    };
    let pick = [5u32, 8, 10, 15, 20, 30];
    let at = |values: &[f64], steps: u32| values[(steps - STEPS.start()) as usize];
    println!("Mean |Δ| (uint8 levels) against a 50-step Euler-ancestral edit (same image and seed):\n");
    println!(
        "| sampler | {} | steps to ≤ 6 | steps to ≤ 4 | 100 steps |",
        pick.map(|s| format!("{s} steps")).join(" | ")
    );
    println!("|---|{}---|---|---|", "---:|".repeat(pick.len()));
    for (name, to_ea, _, own_100) in &rows {
        println!(
            "| {name} | {} | {} | {} | {own_100:.2} |",
            pick.map(|s| format!("{:.2}", at(to_ea, s))).join(" | "),
            first_within(to_ea, 6.0),
            first_within(to_ea, 4.0),
        );
    }
    println!("\nMean |Δ| against the same sampler at 100 steps (its own converged result):\n");
    println!("| sampler | {} | steps to ≤ 2 | steps to ≤ 1 |", pick.map(|s| format!("{s} steps")).join(" | "));
    println!("|---|{}---|---|", "---:|".repeat(pick.len()));
    for (name, _, to_own, _) in &rows {
        println!(
            "| {name} | {} | {} | {} |",
            pick.map(|s| format!("{:.2}", at(to_own, s))).join(" | "),
            first_within(to_own, 2.0),
            first_within(to_own, 1.0),
        );
    }
    if let Some(path) = json_out {
        let json = serde_json::json!({
            "steps": STEPS.collect::<Vec<_>>(),
            "reference": "euler-ancestral, 50 steps",
            "images": ["a.png", "b.png", "c.png"],
            "seeds": [0, 1, 2],
            "samplers": rows.iter().map(|(name, to_ea, to_own, own_100)| serde_json::json!({
                "sampler": name, "to_euler_ancestral_50": to_ea, "to_own_100": to_own,
                "own_100_to_euler_ancestral_50": own_100,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")?;
    }
    Ok(())
}
