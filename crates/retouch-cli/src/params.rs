//! Edit-parameter flags shared by `edit` and `batch`: the same names, meanings and defaults
//! as the job protocol's `params`.

use retouch_core::params::{EditParams, SchedulerKind};

pub(crate) fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse().map_err(|e: retouch_core::params::ParamError| e.message)
}

/// `--steps`, `--guidance-scale`, `--image-guidance-scale`, `--negative-prompt`, `--seed`,
/// `--scheduler`, `--karras-sigmas`, `--max-side`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ParamArgs {
    /// Denoising steps [default: 20].
    #[arg(long)]
    pub steps: Option<u32>,
    /// How strongly to follow the instruction; guidance is off at ≤ 1 [default: 7.5].
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// How closely to keep the input image; guidance is off below 1 [default: 1.5].
    #[arg(long)]
    pub image_guidance_scale: Option<f32>,
    /// What the edit should avoid ("blurry, low quality"): replaces the empty prompt of the
    /// unconditional guidance branches; ignored when guidance is off; at most 4096 bytes.
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// Noise seed (torch CPU generator compatible) [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampler: euler-ancestral, euler, ddim, dpmpp-2m, dpmpp-2m-sde or unipc [default: the
    /// checkpoint's].
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Karras sigmas (diffusers' use_karras_sigmas) for euler, dpmpp-2m, dpmpp-2m-sde and unipc;
    /// `--karras-sigmas=false` turns them off where the checkpoint's config turns them on
    /// [default: the checkpoint's scheduler config].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub karras_sigmas: Option<bool>,
    /// Resize so the longer side is at most this many pixels [default: 512].
    #[arg(long)]
    pub max_side: Option<u32>,
}

impl ParamArgs {
    /// The protocol's parameter object.
    pub fn to_params(&self) -> EditParams {
        EditParams {
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            image_guidance_scale: self.image_guidance_scale,
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            scheduler: self.scheduler,
            karras_sigmas: self.karras_sigmas,
            max_side: self.max_side,
            format: None,
            quality: None,
        }
    }
}
