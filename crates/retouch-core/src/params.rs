//! Edit parameters: names, meanings, defaults and bounds shared by `retouch edit`, the job
//! protocol and `retouch batch`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default denoising steps.
pub const DEFAULT_STEPS: u32 = 20;
/// Default text guidance scale (diffusers' default).
pub const DEFAULT_GUIDANCE_SCALE: f32 = 7.5;
/// Default image guidance scale (diffusers' default).
pub const DEFAULT_IMAGE_GUIDANCE_SCALE: f32 = 1.5;
/// Default bound on the longer side of the processed image, in pixels.
pub const DEFAULT_MAX_SIDE: u32 = 512;
/// Default JPEG quality.
pub const DEFAULT_QUALITY: u8 = 90;
/// Upper bound on steps (diffusers allows up to the training timesteps; more is never useful).
pub const MAX_STEPS: u32 = 500;
/// Upper bound on the instruction and the negative prompt, in bytes (CLIP reads 75 tokens;
/// this only keeps absurd payloads out of queues and logs).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Upper bound on `max_side`: 2048 px is ~16× the work of 512 px and near the memory limit of
/// a 24 GB card at batch 1.
pub const MAX_MAX_SIDE: u32 = 2048;

/// Which sampler runs the denoising loop. Names are those of the CLI and the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// diffusers' `EulerAncestralDiscreteScheduler` (what InstructPix2Pix ships).
    EulerAncestral,
    /// diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// diffusers' `DDIMScheduler` with η = 0.
    Ddim,
    /// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type: dpmsolver++` (DPM++ 2M).
    #[serde(rename = "dpmpp-2m")]
    DpmppTwoM,
    /// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type: sde-dpmsolver++`
    /// (DPM++ 2M SDE): draws noise from each image's generator at every step.
    #[serde(rename = "dpmpp-2m-sde")]
    DpmppTwoMSde,
    /// diffusers' `UniPCMultistepScheduler` (predictor-corrector, `bh2`).
    Unipc,
}

impl SchedulerKind {
    /// Every kind, in documentation order.
    pub const ALL: [SchedulerKind; 6] =
        [Self::EulerAncestral, Self::Euler, Self::Ddim, Self::DpmppTwoM, Self::DpmppTwoMSde, Self::Unipc];

    /// The CLI / protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EulerAncestral => "euler-ancestral",
            Self::Euler => "euler",
            Self::Ddim => "ddim",
            Self::DpmppTwoM => "dpmpp-2m",
            Self::DpmppTwoMSde => "dpmpp-2m-sde",
            Self::Unipc => "unipc",
        }
    }

    /// The diffusers class implementing it.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::DpmppTwoM | Self::DpmppTwoMSde => "DPMSolverMultistepScheduler",
            Self::Unipc => "UniPCMultistepScheduler",
        }
    }

    /// The kind a diffusers class name denotes, if we implement it. `DPMSolverMultistepScheduler`
    /// gives [`Self::DpmppTwoM`]; which DPM++ variant a checkpoint's config means also depends
    /// on its `algorithm_type` (the model crate reads that).
    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.diffusers_class() == class)
    }

    /// Whether the diffusers class has a `use_karras_sigmas` option (diffusers 0.42.1:
    /// `EulerAncestralDiscreteScheduler` and `DDIMScheduler` do not).
    pub fn supports_karras_sigmas(self) -> bool {
        !matches!(self, Self::EulerAncestral | Self::Ddim)
    }

    /// The protocol names of every kind, comma-separated (for error messages).
    pub fn names() -> String {
        Self::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| ParamError {
            field: "scheduler",
            message: format!("unknown scheduler {s:?}; expected one of {}", Self::names()),
        })
    }
}

/// Encoding of the edited image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Lossless PNG (the default).
    Png,
    /// JPEG at `quality`.
    Jpeg,
    /// Lossless WebP (the encoder available without C libraries writes lossless only).
    Webp,
}

impl OutputFormat {
    /// File extension without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    /// MIME type, used as the stored object's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The format a file name's extension names (`png`, `jpg`/`jpeg`, `webp`).
    pub fn from_path(path: &str) -> Option<Self> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }
}

impl FromStr for OutputFormat {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "png" => Ok(Self::Png),
            "jpeg" | "jpg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            _ => Err(ParamError {
                field: "format",
                message: format!("unknown format {s:?}; expected png, jpeg or webp"),
            }),
        }
    }
}

/// A parameter outside its allowed range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    /// The parameter's protocol name.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Edit parameters as given by a user or a job: every field optional, defaults applied by
/// [`EditParams::resolve`]. The field names are the protocol's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// Denoising steps (1–500; default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Text guidance scale (default 7.5). Guidance is off unless > 1 (and image guidance ≥ 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f32>,
    /// Image guidance scale (default 1.5). Guidance is off below 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_guidance_scale: Option<f32>,
    /// What the edit should avoid: its embeddings replace the empty prompt of the two
    /// unconditional guidance branches (diffusers' `negative_prompt`); ignored when guidance is
    /// off. At most [`MAX_TEXT_BYTES`]; absent or empty means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Noise seed; absent means random (`retouch edit`) or derived from the job id (worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Sampler; absent means the checkpoint's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
    /// Karras sigmas (diffusers' `use_karras_sigmas`); absent means the checkpoint's scheduler
    /// config decides (false unless it sets it). Euler-ancestral and DDIM have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub karras_sigmas: Option<bool>,
    /// Longer side bound in pixels (8–2048; default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_side: Option<u32>,
    /// Output encoding (default png).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<OutputFormat>,
    /// JPEG quality 1–100 (default 90); ignored by the lossless formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
}

/// Parameters with defaults applied and bounds checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedParams {
    /// Denoising steps.
    pub steps: u32,
    /// Text guidance scale.
    pub guidance_scale: f32,
    /// Image guidance scale.
    pub image_guidance_scale: f32,
    /// The negative prompt; `None` when absent or empty.
    pub negative_prompt: Option<String>,
    /// The seed actually used.
    pub seed: u64,
    /// `None`: the checkpoint's scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// `None`: as the checkpoint's scheduler config says.
    pub karras_sigmas: Option<bool>,
    /// Longer side bound.
    pub max_side: u32,
    /// Output encoding.
    pub format: OutputFormat,
    /// JPEG quality.
    pub quality: u8,
}

impl EditParams {
    /// Applies defaults (`seed` when none was given) and checks bounds.
    ///
    /// # Errors
    /// [`ParamError`] naming the first parameter out of range.
    pub fn resolve(&self, seed: impl FnOnce() -> u64) -> Result<ResolvedParams, ParamError> {
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ParamError { field: "steps", message: format!("must be 1–{MAX_STEPS}, got {steps}") });
        }
        let finite = |field: &'static str, v: f32| {
            if v.is_finite() && (0.0..=100.0).contains(&v) {
                Ok(v)
            } else {
                Err(ParamError { field, message: format!("must be a number in 0–100, got {v}") })
            }
        };
        let guidance_scale = finite("guidance_scale", self.guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE))?;
        let image_guidance_scale =
            finite("image_guidance_scale", self.image_guidance_scale.unwrap_or(DEFAULT_IMAGE_GUIDANCE_SCALE))?;
        let max_side = self.max_side.unwrap_or(DEFAULT_MAX_SIDE);
        if !(8..=MAX_MAX_SIDE).contains(&max_side) {
            return Err(ParamError {
                field: "max_side", message: format!("must be 8–{MAX_MAX_SIDE}, got {max_side}")
            });
        }
        let negative_prompt = self.negative_prompt.clone().filter(|p| !p.is_empty());
        if let Some(p) = &negative_prompt
            && p.len() > MAX_TEXT_BYTES
        {
            return Err(ParamError {
                field: "negative_prompt",
                message: format!("longer than {MAX_TEXT_BYTES} bytes ({})", p.len()),
            });
        }
        if let (Some(kind), Some(true)) = (self.scheduler, self.karras_sigmas)
            && !kind.supports_karras_sigmas()
        {
            let supported: Vec<&str> =
                SchedulerKind::ALL.iter().filter(|k| k.supports_karras_sigmas()).map(|k| k.as_str()).collect();
            return Err(ParamError {
                field: "karras_sigmas",
                message: format!(
                    "{kind} has no Karras sigmas (diffusers' {} has no use_karras_sigmas); supported: {}",
                    kind.diffusers_class(),
                    supported.join(", ")
                ),
            });
        }
        let quality = self.quality.unwrap_or(DEFAULT_QUALITY);
        if !(1..=100).contains(&quality) {
            return Err(ParamError { field: "quality", message: format!("must be 1–100, got {quality}") });
        }
        Ok(ResolvedParams {
            steps,
            guidance_scale,
            image_guidance_scale,
            negative_prompt,
            seed: self.seed.unwrap_or_else(seed),
            scheduler: self.scheduler,
            karras_sigmas: self.karras_sigmas,
            max_side,
            format: self.format.unwrap_or(OutputFormat::Png),
            quality,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_diffusers_and_the_cli_contract() {
        let p = EditParams::default().resolve(|| 7).expect("defaults are valid");
        assert_eq!(p.steps, 20);
        assert_eq!(p.guidance_scale, 7.5);
        assert_eq!(p.image_guidance_scale, 1.5);
        assert_eq!(p.seed, 7);
        assert_eq!(p.max_side, 512);
        assert_eq!(p.format, OutputFormat::Png);
        assert_eq!(p.scheduler, None);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let e = EditParams { steps: Some(0), ..Default::default() }.resolve(|| 0).expect_err("0 steps");
        assert_eq!(e.field, "steps");
        let e = EditParams { guidance_scale: Some(f32::NAN), ..Default::default() }.resolve(|| 0).expect_err("NaN");
        assert_eq!(e.field, "guidance_scale");
        let e = EditParams { max_side: Some(4096), ..Default::default() }.resolve(|| 0).expect_err("too big");
        assert_eq!(e.field, "max_side");
    }

    #[test]
    fn protocol_json_rejects_unknown_keys_and_schedulers() {
        let e = serde_json::from_str::<EditParams>(r#"{"stpes": 3}"#).expect_err("typo").to_string();
        assert!(e.contains("stpes"), "{e}");
        let e = serde_json::from_str::<EditParams>(r#"{"scheduler": "pndm"}"#).expect_err("pndm").to_string();
        assert!(e.contains("pndm"), "{e}");
        let p: EditParams =
            serde_json::from_str(r#"{"scheduler": "euler-ancestral", "format": "webp"}"#).expect("valid");
        assert_eq!(p.scheduler, Some(SchedulerKind::EulerAncestral));
    }

    #[test]
    fn scheduler_names_round_trip_through_the_cli_and_json_spellings() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.as_str().parse::<SchedulerKind>(), Ok(kind));
            assert_eq!(serde_json::to_value(kind).expect("json"), serde_json::json!(kind.as_str()));
        }
        assert_eq!("dpmpp-2m-sde".parse::<SchedulerKind>(), Ok(SchedulerKind::DpmppTwoMSde));
        assert_eq!(SchedulerKind::from_diffusers_class("UniPCMultistepScheduler"), Some(SchedulerKind::Unipc));
        let e = "dpm++".parse::<SchedulerKind>().expect_err("unknown");
        assert!(e.message.contains("dpmpp-2m, dpmpp-2m-sde, unipc"), "{}", e.message);
    }

    #[test]
    fn negative_prompts_are_bounded_and_empty_means_none() {
        let p = EditParams { negative_prompt: Some(String::new()), ..Default::default() }.resolve(|| 0).expect("ok");
        assert_eq!(p.negative_prompt, None);
        let p = EditParams { negative_prompt: Some("blurry".into()), ..Default::default() }.resolve(|| 0).expect("ok");
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry"));
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        let e = EditParams { negative_prompt: Some(long), ..Default::default() }.resolve(|| 0).expect_err("long");
        assert_eq!(e.field, "negative_prompt");
        let at_limit = "x".repeat(MAX_TEXT_BYTES);
        assert!(EditParams { negative_prompt: Some(at_limit), ..Default::default() }.resolve(|| 0).is_ok());
    }

    #[test]
    fn karras_sigmas_are_refused_where_diffusers_has_none() {
        for kind in SchedulerKind::ALL {
            let params = EditParams { scheduler: Some(kind), karras_sigmas: Some(true), ..Default::default() };
            let expected = !matches!(kind, SchedulerKind::EulerAncestral | SchedulerKind::Ddim);
            match params.resolve(|| 0) {
                Ok(p) => assert!(expected && p.karras_sigmas == Some(true), "{kind}"),
                Err(e) => {
                    assert!(!expected && e.field == "karras_sigmas" && e.message.contains(kind.as_str()), "{kind}")
                }
            }
            // Turning them off is always allowed (it is the default).
            let off = EditParams { scheduler: Some(kind), karras_sigmas: Some(false), ..Default::default() };
            assert!(off.resolve(|| 0).is_ok(), "{kind}");
        }
        // Without a named scheduler the model decides (its default may support them).
        assert!(EditParams { karras_sigmas: Some(true), ..Default::default() }.resolve(|| 0).is_ok());
    }
}
