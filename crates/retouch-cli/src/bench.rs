//! `retouch bench`: stage timings of the model on this machine, defined as
//! `bench/diffusers_bench.py` defines them for diffusers, so the two tables compare directly.
//!
//! Stages (N = `--batch` images of S×S px, K = `--steps`):
//! * `text_encode`: CLIP on the N instructions and the empty negative prompt;
//! * `vae_encode`: VAE posterior mean of the N images;
//! * `unet_call`: one UNet call at batch 3N (guidance on) with t = 999;
//! * `vae_decode`: decode N latents to images;
//! * `edit`: the whole batched edit, K steps of `--scheduler` (Euler-ancestral unless given,
//!   with `--karras-sigmas` where it has them).
//!
//! Each stage runs `--warmup` untimed times, then `--repeats` timed times; median, min and max
//! are reported with the peak RSS of the process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use image::RgbImage;
use retouch_core::editor::{EditBatch, EditRequest, Editor, NoProgress};
use retouch_core::params::SchedulerKind;
use serde_json::json;

use crate::model::{ModelArgs, ModelSettings};

/// Flags of `retouch bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image side in pixels (square inputs).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Denoising steps of the whole-edit stage.
    #[arg(long, default_value_t = 10)]
    pub steps: u32,
    /// Images per batch (the UNet runs at 3× this).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Untimed runs per stage.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per stage (the whole edit uses `--edit-repeats`).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Timed runs of the whole edit.
    #[arg(long, default_value_t = 1)]
    pub edit_repeats: usize,
    /// Sampler of the whole-edit stage: euler-ancestral, euler, ddim, dpmpp-2m, dpmpp-2m-sde or
    /// unipc.
    #[arg(long, default_value = "euler-ancestral", value_parser = crate::params::parse_scheduler)]
    pub scheduler: SchedulerKind,
    /// Karras sigmas for the whole-edit stage (euler, dpmpp-2m, dpmpp-2m-sde, unipc).
    #[arg(long)]
    pub karras_sigmas: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Peak and current resident set size in MiB, from `/proc/self/status`.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct Stage {
    name: &'static str,
    seconds: Vec<f64>,
}

impl Stage {
    /// The median run, as Python's `statistics.median` (the mean of the middle two for an even
    /// count), so the numbers compare with bench/diffusers_bench.py's.
    fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        if s.len().is_multiple_of(2) { (s[mid - 1] + s[mid]) / 2.0 } else { s[mid] }
    }
}

/// Times `f` on `device`: a GPU runs work asynchronously, so each run ends with a device
/// synchronisation before the clock stops (a no-op on the CPU).
fn time<T>(
    name: &'static str,
    device: &candle_core::Device,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Stage> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    let stage = Stage { name, seconds };
    eprintln!("{name}: median {:.4} s", stage.median());
    Ok(stage)
}

/// A structured test image: gradients and a disc, so the VAE sees realistic statistics.
fn test_image(size: u32, salt: u32) -> RgbImage {
    RgbImage::from_fn(size, size, |x, y| {
        let (cx, cy) = (size as i64 / 2, size as i64 / 3);
        let inside = (x as i64 - cx).pow(2) + (y as i64 - cy).pow(2) < (size as i64 / 4).pow(2);
        let v = |k: u32| ((x * k + y * (k + 1) + salt * 37) % 256) as u8;
        if inside { image::Rgb([220, v(1), 40]) } else { image::Rgb([v(1), v(2), v(3)]) }
    })
}

/// Runs `retouch bench`.
///
/// # Errors
/// Model loading and compute failures.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.karras_sigmas && !args.scheduler.supports_karras_sigmas() {
        return Err(crate::cli_error::bad_input(format!(
            "--karras-sigmas: {} has no Karras sigmas (diffusers' {} has no use_karras_sigmas)",
            args.scheduler,
            args.scheduler.diffusers_class()
        )));
    }
    // The stages are timed without the safety checker unless --safety-checker asks for it
    // (its cost is one CLIP vision pass per image after decoding).
    let settings = ModelSettings {
        safety_checker: args.model.safety_checker.unwrap_or(retouch_core::safety::SafetyPolicy::Off),
        ..args.model.settings()?
    };
    let load_started = Instant::now();
    let model = crate::model::load_blocking(&settings)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let dev = model.device().clone();
    let (_, rss_after_load) = rss_mib();
    let n = args.batch.max(1);
    let images: Vec<RgbImage> = (0..n as u32).map(|i| test_image(args.size, i)).collect();
    let instructions: Vec<String> = (0..n).map(|i| format!("make it look like winter, variant {i}")).collect();
    let (w, r) = (args.warmup, args.repeats);

    let text = time("text_encode", &dev, w, r, || {
        model.encode_prompt("")?;
        for p in &instructions {
            model.encode_prompt(p)?;
        }
        Ok(())
    })?;
    let image_refs: Vec<&RgbImage> = images.iter().collect();
    let vae_encode = time("vae_encode", &dev, w, r, || Ok(model.encode_images(&image_refs)?))?;

    let f = (args.size / model.info().size_multiple) as usize;
    let (emb, _) = model.encode_prompt(&instructions[0])?;
    let context = emb.repeat((3 * n, 1, 1))?;
    let x = Tensor::randn(0f32, 1.0, (3 * n, 8, f, f), &dev)?.to_dtype(model.dtype())?;
    let unet =
        time("unet_call", &dev, w, r, || Ok(model.unet().forward(&x, 999.0, &context)?.to_dtype(DType::F32)?))?;

    let latents = Tensor::randn(0f32, 1.0, (n, 4, f, f), &dev)?;
    let vae_decode = time("vae_decode", &dev, w, r, || Ok(model.decode(&latents)?))?;

    let batch = EditBatch {
        steps: args.steps,
        scheduler: Some(args.scheduler),
        karras_sigmas: Some(args.karras_sigmas),
        requests: images
            .iter()
            .zip(&instructions)
            .enumerate()
            .map(|(i, (image, instruction))| EditRequest {
                image: image.clone(),
                instruction: instruction.clone(),
                negative_prompt: None,
                seed: i as u64,
                guidance_scale: 7.5,
                image_guidance_scale: 1.5,
                init_latents: None,
            })
            .collect(),
    };
    let edit = time("edit", &dev, 0, args.edit_repeats, || Ok(model.run(&batch, &mut NoProgress)?))?;

    let (peak, _) = rss_mib();
    let stages = [text, vae_encode, unet, vae_decode, edit];
    println!(
        "retouch {} | {} {} | {} | {}×{} px, batch {n}, {} steps of {}{}, threads {}",
        env!("CARGO_PKG_VERSION"),
        model.info().device,
        model.info().dtype,
        model.kernels(),
        args.size,
        args.size,
        args.steps,
        args.scheduler,
        if args.karras_sigmas { " (Karras sigmas)" } else { "" },
        candle_core::utils::get_num_threads()
    );
    println!("{:<12} {:>10} {:>10} {:>10}", "stage", "median s", "min s", "max s");
    for s in &stages {
        let min = s.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = s.seconds.iter().copied().fold(0.0, f64::max);
        println!("{:<12} {:>10.4} {:>10.4} {:>10.4}", s.name, s.median(), min, max);
    }
    println!("load {load_seconds:.2} s, RSS after load {rss_after_load:.0} MiB, peak RSS {peak:.0} MiB");

    if let Some(path) = &args.json {
        let report = json!({
            "implementation": "retouch",
            "version": env!("CARGO_PKG_VERSION"),
            "model": settings.source,
            "device": model.info().device,
            "dtype": model.info().dtype,
            "kernels": {"conv": model.kernels().conv.to_string(), "attention": model.kernels().attention.to_string(), "linear": model.kernels().linear.to_string()},
            "size": args.size,
            "steps": args.steps,
            "scheduler": args.scheduler.as_str(),
            "karras_sigmas": args.karras_sigmas,
            "batch": n,
            "threads": candle_core::utils::get_num_threads(),
            "load_seconds": load_seconds,
            "rss_after_load_mb": rss_after_load,
            "peak_rss_mb": peak,
            "stages": stages.iter().map(|s| (s.name.to_string(), json!({
                "median_s": s.median(),
                "runs_s": s.seconds,
            }))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
