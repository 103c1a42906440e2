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
}

impl SchedulerKind {
    /// Every kind, in documentation order.
    pub const ALL: [SchedulerKind; 3] = [Self::EulerAncestral, Self::Euler, Self::Ddim];

    /// The CLI / protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EulerAncestral => "euler-ancestral",
            Self::Euler => "euler",
            Self::Ddim => "ddim",
        }
    }

    /// The diffusers class implementing it.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
        }
    }

    /// The kind a diffusers class name denotes, if we implement it.
    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.diffusers_class() == class)
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
            message: format!("unknown scheduler {s:?}; expected one of euler-ancestral, euler, ddim"),
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
    /// Noise seed; absent means random (`retouch edit`) or derived from the job id (worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Sampler; absent means the checkpoint's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResolvedParams {
    /// Denoising steps.
    pub steps: u32,
    /// Text guidance scale.
    pub guidance_scale: f32,
    /// Image guidance scale.
    pub image_guidance_scale: f32,
    /// The seed actually used.
    pub seed: u64,
    /// `None`: the checkpoint's scheduler.
    pub scheduler: Option<SchedulerKind>,
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
        let quality = self.quality.unwrap_or(DEFAULT_QUALITY);
        if !(1..=100).contains(&quality) {
            return Err(ParamError { field: "quality", message: format!("must be 1–100, got {quality}") });
        }
        Ok(ResolvedParams {
            steps,
            guidance_scale,
            image_guidance_scale,
            seed: self.seed.unwrap_or_else(seed),
            scheduler: self.scheduler,
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
}
