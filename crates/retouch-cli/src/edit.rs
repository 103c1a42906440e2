//! `retouch edit`: one image, one instruction, one output file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use retouch_core::editor::{EditBatch, EditRequest, Editor};
use retouch_core::imaging::{self, DecodeLimits, ImageError};
use retouch_core::params::OutputFormat;

use crate::cli_error::bad_input;
use crate::model::ModelArgs;
use crate::params::ParamArgs;
use crate::progress::StepBar;

/// Flags of `retouch edit`. These names are a contract: scripts call them.
#[derive(clap::Args, Debug)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input image (PNG, JPEG, WebP, …).
    #[arg(long)]
    pub image: PathBuf,
    /// What to change, in plain language ("make it snowy").
    #[arg(long)]
    pub instruction: String,
    /// Output file; the extension picks the format (png, jpg/jpeg, webp).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub params: ParamArgs,
    /// Safetensors file with one f32 tensor `latents` [1,4,H/8,W/8]: unscaled initial noise
    /// used instead of the seeded draw (diffusers' `latents=`).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// JPEG quality (1–100).
    #[arg(long, default_value_t = retouch_core::params::DEFAULT_QUALITY)]
    pub quality: u8,
}

fn read_init_latents(path: &PathBuf) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(format!("--init-latents {}: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad_input(format!("--init-latents {}: not a safetensors file: {e}", path.display())))?;
    let view = st
        .tensor("latents")
        .map_err(|_| bad_input(format!("--init-latents {}: no tensor named `latents`", path.display())))?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 4 || view.shape()[0] != 1 {
        return Err(bad_input(format!(
            "--init-latents {}: `latents` must be f32 [1, 4, H/8, W/8], found {:?} {:?}",
            path.display(),
            view.dtype(),
            view.shape()
        )));
    }
    Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Runs `retouch edit`.
///
/// # Errors
/// Bad input (exit 2) for unreadable or invalid inputs; model and I/O failures otherwise.
pub fn run(args: EditArgs) -> anyhow::Result<()> {
    let format = OutputFormat::from_path(&args.output.to_string_lossy()).ok_or_else(|| {
        bad_input(format!("--output {}: unknown extension; use .png, .jpg/.jpeg or .webp", args.output.display()))
    })?;
    let mut params = args.params.to_params();
    params.quality = Some(args.quality);
    // torch's CPU generator uses the low 32 bits of a seed, so random seeds are drawn there.
    let params = params
        .resolve(|| u64::from(rand::random::<u32>()))
        .map_err(|e| bad_input(format!("--{}: {}", e.field.replace('_', "-"), e.message)))?;
    let model_settings = args.model.settings()?;
    // Every input is checked before the model loads (seconds to minutes with real weights).
    let bytes = std::fs::read(&args.image).map_err(|e| bad_input(format!("--image {}: {e}", args.image.display())))?;
    imaging::decode(&bytes, DecodeLimits::default())
        .map_err(|e| bad_input(format!("--image {}: {e}", args.image.display())))?;
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(bad_input(format!(
            "--output {}: the folder {} does not exist",
            args.output.display(),
            dir.display()
        )));
    }
    let init_latents = args.init_latents.as_ref().map(read_init_latents).transpose()?;
    if params.guidance_scale <= 1.0 || params.image_guidance_scale < 1.0 {
        tracing::info!("guidance is off (guidance_scale ≤ 1 or image_guidance_scale < 1): one UNet branch per step");
        if params.negative_prompt.is_some() {
            tracing::warn!("guidance is off, so the negative prompt is ignored (as in diffusers)");
        }
    }
    eprintln!("seed: {}", params.seed);

    let load_started = Instant::now();
    let model = crate::model::load_blocking(&model_settings)?;
    let load_seconds = load_started.elapsed().as_secs_f64();

    let multiple = model.info().size_multiple;
    let prepared =
        imaging::prepare(&bytes, DecodeLimits::default(), params.max_side, multiple).map_err(|e| match e {
            ImageError::Encode(_) => anyhow::Error::new(e),
            other => bad_input(format!("--image {}: {other}", args.image.display())),
        })?;
    let (width, height) = prepared.image.dimensions();
    if prepared.had_alpha {
        tracing::info!("the input has transparency: flattened onto white");
    }
    let latents_numel = 4 * (height / multiple) as usize * (width / multiple) as usize;
    if let Some(latents) = &init_latents
        && latents.len() != latents_numel
    {
        return Err(bad_input(format!(
            "--init-latents has {} values; this image needs [1, 4, {}, {}]",
            latents.len(),
            height / multiple,
            width / multiple
        )));
    }

    let scheduler = params.scheduler.or(model.info().default_scheduler);
    let batch = EditBatch {
        steps: params.steps,
        scheduler: params.scheduler,
        karras_sigmas: params.karras_sigmas,
        requests: vec![EditRequest {
            image: prepared.image,
            instruction: args.instruction.clone(),
            negative_prompt: params.negative_prompt.clone(),
            seed: params.seed,
            guidance_scale: params.guidance_scale,
            image_guidance_scale: params.image_guidance_scale,
            init_latents,
        }],
    };
    let mut bar = StepBar::new(u64::from(params.steps), "editing");
    let edit_started = Instant::now();
    let result = model.edit(&batch, &mut bar);
    bar.finish();
    let mut edited = result.map_err(|e| match e.kind {
        retouch_core::editor::EditErrorKind::InvalidInput => bad_input(e.message),
        _ => anyhow::anyhow!("edit failed: {}", e.message),
    })?;
    let edit_seconds = edit_started.elapsed().as_secs_f64();
    let output = edited.pop().context("the model returned no image")?;
    if output.instruction_truncated {
        tracing::warn!("the instruction is longer than 77 CLIP tokens; its end was ignored");
    }
    if output.nsfw_content_detected == Some(true) {
        if model_settings.safety_checker.blocks() {
            anyhow::bail!(
                "the safety checker flagged the edited image (nsfw); nothing was written (--safety-checker block)"
            );
        }
        eprintln!("nsfw content detected: the safety checker flagged the image; the output is black");
    }

    let encoded = imaging::encode(&output.image, format, params.quality)?;
    std::fs::write(&args.output, encoded).with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "{} → {} ({}×{}, {} steps, {}, seed {}) in {:.2} s: load {:.2} s, edit {:.2} s ({:.3} s/step)",
        args.image.display(),
        args.output.display(),
        width,
        height,
        params.steps,
        match (scheduler, params.karras_sigmas) {
            (Some(s), Some(true)) => format!("{s} with Karras sigmas"),
            (Some(s), _) => s.to_string(),
            (None, _) => "?".into(),
        },
        params.seed,
        load_seconds + edit_seconds,
        load_seconds,
        edit_seconds,
        edit_seconds / f64::from(params.steps),
    );
    Ok(())
}
