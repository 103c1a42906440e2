//! diffusers' `StableDiffusionSafetyChecker`, run as the pipeline runs it.
//!
//! After decoding, diffusers hands each uint8 output image to the checkpoint's
//! `feature_extractor` (transformers' `CLIPImageProcessor`) and the resulting `pixel_values`,
//! cast to the model dtype, to the checker:
//! 1. **Preprocessing** ([`ImageProcessor`], from `feature_extractor/preprocessor_config.json`):
//!    resize so the shortest side is `size.shortest_edge` (the other side
//!    `int(edge · long / short)`), with **Pillow's bicubic** filter — transformers 5.24's
//!    `CLIPImageProcessor` is the torchvision backend, but without torchvision installed (the
//!    pinned fixture environment) it falls back to `CLIPImageProcessorPil`, which resizes with
//!    Pillow; that is what diffusers gets there, and what [`resize_bicubic`] reproduces bit for
//!    bit — then a centre crop (`top = (h − crop_h) // 2`), `u8 · rescale_factor` in float64
//!    stored as float32, and `(x − mean) / std` in float32 per channel.
//! 2. **The checker** ([`SafetyChecker`]): the CLIP vision tower's pooled output through
//!    `visual_projection` (no bias), then cosine similarities (`F.normalize` both sides, in the
//!    model dtype) with 3 special-care and 17 concept embeddings.
//! 3. **The decision** ([`decide`], float32 as numpy computes it): per special-care concept
//!    `score = round(cos − threshold + adjustment, 3)`; a positive score marks it and sets the
//!    adjustment to 0.01 for every concept checked after it (the remaining special-care ones,
//!    then all 17 concepts); an image with any positive concept score is flagged, and the
//!    pipeline then makes it black.
//!
//! Each image is checked on its own (one tower call per image), so a decision depends only on
//! its image, never on its batch.
//!
//! Tensor names: the real checkpoints (transformers 4.x) nest the tower as
//! `vision_model.vision_model.*`; transformers 5 writes `vision_model.*`. Both load, through
//! the ledger of [`crate::weights`] (the `position_ids` buffer older files carry is the only
//! tensor allowed to stay unused).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use image::RgbImage;
use retouch_core::imaging::resize_bicubic;
use serde_json::{Map, Value};

use crate::config::{ConfigReader, read_json_object};
use crate::error::ModelError;
use crate::kernels::LinearBackend;
use crate::nets::clip::ClipActivation;
use crate::nets::clip_vision::{ClipVisionConfig, ClipVisionTower, l2_normalize};
use crate::weights::{find_weight_files, load_component};

/// Concept embeddings of `StableDiffusionSafetyChecker` (fixed by its `__init__`).
pub const CONCEPTS: usize = 17;
/// Special-care embeddings of `StableDiffusionSafetyChecker`.
pub const SPECIAL_CARE: usize = 3;
/// What a special-care hit adds to every later score (diffusers' `adjustment = 0.01`).
pub const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// Buffers in checker files that never affect inference.
const IGNORABLE: &[&str] = &["position_ids"];

/// Whether `model_index.json` names a component: `[library, class]` with a class, not
/// `[null, null]` (diffusers' way of saying "none").
pub fn names_component(index: &Map<String, Value>, name: &str) -> Option<String> {
    match index.get(name) {
        Some(Value::Array(pair)) => pair.get(1).and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Whether the checkpoint ships a safety checker that diffusers would load and run: both
/// `safety_checker` and `feature_extractor` named in `model_index.json`
/// (`requires_safety_checker` plays no part: it only decides whether *removing* the checker
/// logs a warning).
///
/// # Errors
/// [`ModelError::UnsupportedConfig`] for a checker class other than
/// `StableDiffusionSafetyChecker`, or a checker without a feature extractor (diffusers refuses
/// that pipeline too).
pub fn checkpoint_has_checker(index: &Map<String, Value>) -> Result<bool, ModelError> {
    let err = |key: &str, message: String| ModelError::UnsupportedConfig {
        component: "model_index",
        key: key.to_string(),
        message,
    };
    let Some(class) = names_component(index, "safety_checker") else { return Ok(false) };
    if class != "StableDiffusionSafetyChecker" {
        return Err(err("safety_checker", format!("{class:?} is not supported (only StableDiffusionSafetyChecker)")));
    }
    match names_component(index, "feature_extractor").as_deref() {
        Some("CLIPImageProcessor" | "CLIPFeatureExtractor") => Ok(true),
        Some(other) => Err(err("feature_extractor", format!("{other:?} is not supported (only CLIPImageProcessor)"))),
        None => Err(err(
            "feature_extractor",
            "a safety checker needs a feature extractor (diffusers refuses this pipeline too)".into(),
        )),
    }
}

/// The checker's shape: transformers `CLIPConfig` (`safety_checker/config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct SafetyCheckerConfig {
    /// The vision tower (`vision_config`).
    pub vision: ClipVisionConfig,
    /// Width of the projected embedding (`projection_dim` of the `CLIPConfig`, not of its
    /// `vision_config`).
    pub projection_dim: usize,
}

impl SafetyCheckerConfig {
    /// Parses `safety_checker/config.json`, with `CLIPVisionConfig`'s defaults for absent keys.
    /// transformers configs carry many generic keys, so unknown keys are not errors here; the
    /// keys that shape the maths are checked.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedConfig`] for an activation this tower does not implement or
    /// an inconsistent geometry.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ModelError> {
        let top = ConfigReader::new("safety_checker", map);
        let projection_dim = top.usize("projection_dim", Some(512))?;
        let empty = Map::new();
        let vision = match map.get("vision_config") {
            Some(Value::Object(v)) => v,
            None | Some(Value::Null) => &empty,
            Some(other) => return Err(top.err("vision_config", format!("expected an object, found {other}"))),
        };
        let r = ConfigReader::new("safety_checker", vision);
        let activation = ClipActivation::from_name(&r.one_of("hidden_act", "quick_gelu", &ClipActivation::NAMES)?);
        let vision = ClipVisionConfig {
            hidden_size: r.usize("hidden_size", Some(768))?,
            intermediate_size: r.usize("intermediate_size", Some(3072))?,
            num_hidden_layers: r.usize("num_hidden_layers", Some(12))?,
            num_attention_heads: r.usize("num_attention_heads", Some(12))?,
            num_channels: r.usize("num_channels", Some(3))?,
            image_size: r.usize("image_size", Some(224))?,
            patch_size: r.usize("patch_size", Some(32))?,
            activation,
            layer_norm_eps: r.f64("layer_norm_eps", 1e-5)?,
        };
        if vision.num_channels != 3 {
            return Err(r.err("num_channels", format!("{} is not supported (RGB only)", vision.num_channels)));
        }
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
            return Err(
                r.err("patch_size", format!("{} does not divide image_size {}", vision.patch_size, vision.image_size))
            );
        }
        if vision.num_attention_heads == 0 || !vision.hidden_size.is_multiple_of(vision.num_attention_heads) {
            return Err(r.err(
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", vision.num_attention_heads, vision.hidden_size),
            ));
        }
        if vision.layer_norm_eps.is_nan() || vision.layer_norm_eps <= 0.0 {
            return Err(r.err("layer_norm_eps", "must be positive"));
        }
        Ok(Self { vision, projection_dim })
    }
}

/// How the preprocessing resizes (`size` of the image processor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shortest side to this many pixels, keeping the aspect ratio (the other side truncated).
    ShortestEdge(usize),
    /// Exactly this size.
    Exact {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
    },
}

/// transformers' `CLIPImageProcessor`, from `preprocessor_config.json` (both the
/// `image_processor` form with `size: {"shortest_edge": N}`, `crop_size: {"height", "width"}`
/// and the older feature-extractor form with plain integers).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// `do_resize` and `size`.
    pub resize: Option<ResizeTarget>,
    /// `do_center_crop` and `crop_size` as `(height, width)`.
    pub crop: Option<(usize, usize)>,
    /// `do_rescale` and `rescale_factor` (1/255).
    pub rescale: Option<f64>,
    /// `do_normalize`: per-channel mean and std, as float32 (numpy's `np.array(mean, float32)`).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// Pillow's `Image.BICUBIC` (`PILImageResampling.BICUBIC`).
const PIL_BICUBIC: usize = 3;

impl ImageProcessor {
    /// Parses `preprocessor_config.json`.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedConfig`] naming a key this implementation does not honour (a
    /// resampling filter other than bicubic, padding, an unknown key).
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ModelError> {
        let r = ConfigReader::new("feature_extractor", map);
        // The class names are informational; the image is RGB already.
        r.ignore(&["feature_extractor_type", "image_processor_type", "processor_class", "do_convert_rgb"]);
        let default_to_square = r.bool("default_to_square", false)?;
        r.bool_is("use_square_size", false, false)?;
        r.bool_is("do_pad", false, false)?;
        if r.usize("resample", Some(PIL_BICUBIC))? != PIL_BICUBIC {
            return Err(r.err("resample", "only 3 (bicubic) is supported"));
        }
        let pair = |key: &str, v: &Value| -> Result<(usize, usize), ModelError> {
            let side = |k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as usize);
            match (side("height"), side("width")) {
                (Some(h), Some(w)) => Ok((h, w)),
                _ => Err(r.err(key, format!("expected an integer or {{\"height\", \"width\"}}, found {v}"))),
            }
        };
        let resize = if r.bool("do_resize", true)? {
            Some(match r.get("size") {
                None => ResizeTarget::ShortestEdge(224),
                Some(Value::Number(n)) => {
                    let n =
                        n.as_u64().ok_or_else(|| r.err("size", format!("expected a positive integer, found {n}")))?
                            as usize;
                    if default_to_square {
                        ResizeTarget::Exact { height: n, width: n }
                    } else {
                        ResizeTarget::ShortestEdge(n)
                    }
                }
                Some(v @ Value::Object(o)) => match o.get("shortest_edge").and_then(Value::as_u64) {
                    Some(n) if o.len() == 1 => ResizeTarget::ShortestEdge(n as usize),
                    _ => {
                        let (height, width) = pair("size", v)?;
                        ResizeTarget::Exact { height, width }
                    }
                },
                Some(v) => return Err(r.err("size", format!("{v} is not supported"))),
            })
        } else {
            r.ignore(&["size"]);
            None
        };
        let crop = if r.bool("do_center_crop", true)? {
            Some(match r.get("crop_size") {
                None => (224, 224),
                Some(Value::Number(n)) => {
                    let n = n.as_u64().ok_or_else(|| r.err("crop_size", format!("expected an integer, found {n}")))?;
                    (n as usize, n as usize)
                }
                Some(v) => pair("crop_size", v)?,
            })
        } else {
            r.ignore(&["crop_size"]);
            None
        };
        let rescale = if r.bool("do_rescale", true)? { Some(r.f64("rescale_factor", 1.0 / 255.0)?) } else { None };
        r.ignore(&["rescale_factor"]);
        let triple = |key: &str, default: [f64; 3]| -> Result<[f32; 3], ModelError> {
            let values: Vec<f64> = match r.get(key) {
                None => default.to_vec(),
                Some(Value::Number(n)) => vec![n.as_f64().unwrap_or(f64::NAN); 3],
                Some(Value::Array(items)) => items.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect(),
                Some(v) => return Err(r.err(key, format!("expected a number or 3 numbers, found {v}"))),
            };
            match values.as_slice() {
                [a, b, c] if values.iter().all(|v| v.is_finite()) => Ok([*a as f32, *b as f32, *c as f32]),
                _ => Err(r.err(key, format!("expected 3 finite numbers, found {values:?}"))),
            }
        };
        let normalize = if r.bool("do_normalize", true)? {
            // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, CLIPImageProcessor's defaults.
            let mean = triple("image_mean", [0.48145466, 0.4578275, 0.40821073])?;
            let std = triple("image_std", [0.26862954, 0.26130258, 0.27577711])?;
            if std.contains(&0.0) {
                return Err(r.err("image_std", "must not be 0"));
            }
            Some((mean, std))
        } else {
            r.ignore(&["image_mean", "image_std"]);
            None
        };
        r.finish()?;
        let processor = Self { resize, crop, rescale, normalize };
        if let (Some(ResizeTarget::ShortestEdge(edge)), Some((ch, cw))) = (resize, crop)
            && (ch > edge || cw > edge)
        {
            return Err(ModelError::UnsupportedConfig {
                component: "feature_extractor",
                key: "crop_size".into(),
                message: format!(
                    "a {ch}×{cw} crop exceeds the resized shortest side {edge} (padding is not implemented)"
                ),
            });
        }
        Ok(processor)
    }

    /// The size transformers resizes a `width × height` image to: `(width, height)`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (width, height),
            Some(ResizeTarget::Exact { height: h, width: w }) => (w, h),
            Some(ResizeTarget::ShortestEdge(edge)) => {
                // get_resize_output_image_size: int(edge * long / short), Python's true division.
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = ((edge * long) as f64 / short as f64) as usize;
                if width <= height { (edge, new_long) } else { (new_long, edge) }
            }
        }
    }

    /// The uint8 image after resize and centre crop, as transformers has it before rescaling.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when the crop does not fit the resized image.
    pub fn resize_and_crop(&self, image: &RgbImage) -> Result<RgbImage, ModelError> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (rw, rh) = self.resized_size(w, h);
        if rw == 0 || rh == 0 {
            return Err(ModelError::InvalidInput(format!("a {w}×{h} image resizes to nothing")));
        }
        let resized = resize_bicubic(image, rw as u32, rh as u32);
        let Some((ch, cw)) = self.crop else { return Ok(resized) };
        if ch > rh || cw > rw {
            return Err(ModelError::InvalidInput(format!("a {cw}×{ch} crop does not fit {rw}×{rh}")));
        }
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        Ok(image::imageops::crop_imm(&resized, left as u32, top as u32, cw as u32, ch as u32).to_image())
    }

    /// The float32 value transformers gives channel `c` at level `v`: `u8 · rescale` in
    /// float64 stored as float32, then `(x − mean) / std` in float32.
    pub fn level(&self, c: usize, v: u8) -> f32 {
        let x = match self.rescale {
            Some(factor) => (f64::from(v) * factor) as f32,
            None => f32::from(v),
        };
        match self.normalize {
            Some((mean, std)) => (x - mean[c]) / std[c],
            None => x,
        }
    }

    /// `pixel_values` of one image, channel-first (`[3, crop_h, crop_w]`, row-major).
    ///
    /// # Errors
    /// As [`Self::resize_and_crop`].
    pub fn pixel_values(&self, image: &RgbImage) -> Result<(Vec<f32>, usize, usize), ModelError> {
        let cropped = self.resize_and_crop(image)?;
        let (w, h) = (cropped.width() as usize, cropped.height() as usize);
        let table: Vec<[f32; 256]> = (0..3).map(|c| std::array::from_fn(|v| self.level(c, v as u8))).collect();
        let raw = cropped.as_raw();
        let mut out = Vec::with_capacity(3 * w * h);
        for (c, levels) in table.iter().enumerate() {
            out.extend(raw.iter().skip(c).step_by(3).map(|&v| levels[usize::from(v)]));
        }
        Ok((out, h, w))
    }
}

/// One image's verdict, with the numbers diffusers computes on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetyReport {
    /// Cosine similarity with each special-care embedding (float32).
    pub special_cos: Vec<f32>,
    /// Cosine similarity with each concept embedding (float32).
    pub concept_cos: Vec<f32>,
    /// `round(cos − threshold + adjustment, 3)` per special-care concept.
    pub special_scores: Vec<f32>,
    /// The same per concept.
    pub concept_scores: Vec<f32>,
    /// Special-care concepts with a positive score.
    pub special_care: Vec<usize>,
    /// Concepts with a positive score.
    pub bad_concepts: Vec<usize>,
    /// Any bad concept: the image is flagged (diffusers' `has_nsfw_concept`).
    pub nsfw: bool,
}

/// numpy's `round(x, 3)` of a float32: `rint(x · 1000) / 1000`, each step in float32.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// diffusers' decision for one image from its cosines and the thresholds (all float32, as
/// numpy computes `np.float32 − float + float`).
pub fn decide(
    special_cos: &[f32],
    special_thresholds: &[f32],
    concept_cos: &[f32],
    concept_thresholds: &[f32],
) -> SafetyReport {
    let mut adjustment = 0.0f32;
    let mut special_scores = Vec::with_capacity(special_cos.len());
    let mut special_care = Vec::new();
    for (k, (&cos, &threshold)) in special_cos.iter().zip(special_thresholds).enumerate() {
        let score = round3(cos - threshold + adjustment);
        special_scores.push(score);
        if score > 0.0 {
            special_care.push(k);
            adjustment = SPECIAL_CARE_ADJUSTMENT;
        }
    }
    let mut concept_scores = Vec::with_capacity(concept_cos.len());
    let mut bad_concepts = Vec::new();
    for (k, (&cos, &threshold)) in concept_cos.iter().zip(concept_thresholds).enumerate() {
        let score = round3(cos - threshold + adjustment);
        concept_scores.push(score);
        if score > 0.0 {
            bad_concepts.push(k);
        }
    }
    SafetyReport {
        special_cos: special_cos.to_vec(),
        concept_cos: concept_cos.to_vec(),
        special_scores,
        concept_scores,
        special_care,
        nsfw: !bad_concepts.is_empty(),
        bad_concepts,
    }
}

/// The checker's networks and embeddings, as built from the weights.
#[derive(Debug)]
struct Networks {
    /// The CLIP vision tower (`vision_model`).
    tower: ClipVisionTower,
    /// `visual_projection`, `[projection_dim, hidden]`, no bias.
    visual_projection: Linear,
    /// `concept_embeds` `[17, P]`, L2-normalised once at load (model dtype). Multiplied through
    /// a transposed view, as before: a contiguous transposed copy changes the matmul's rounding
    /// enough to move a 3-decimal score off diffusers' (the parity test saw it).
    concept_bank: Tensor,
    /// `special_care_embeds` `[3, P]`, likewise.
    special_care_bank: Tensor,
    /// `concept_embeds_weights` as float32 values of the stored (model-dtype) tensor.
    concept_thresholds: Vec<f32>,
    /// `special_care_embeds_weights`, likewise.
    special_thresholds: Vec<f32>,
}

/// Tensor used to tell the transformers 4.x nesting (`vision_model.vision_model.*`) apart.
const NESTED_PROBE: &str = "vision_model.vision_model.post_layernorm.weight";

impl Networks {
    fn new(config: &SafetyCheckerConfig, linear: LinearBackend, vb: VarBuilder) -> candle_core::Result<Self> {
        let tower_vb = if vb.contains_tensor(NESTED_PROBE) {
            vb.pp("vision_model").pp("vision_model")
        } else {
            vb.pp("vision_model")
        };
        let tower = ClipVisionTower::new(&config.vision, linear, tower_vb)?;
        let p = config.projection_dim;
        let visual_projection = candle_nn::linear_no_bias(config.vision.hidden_size, p, vb.pp("visual_projection"))?;
        let thresholds = |name: &str, n: usize| -> candle_core::Result<Vec<f32>> {
            vb.get(n, name)?.to_dtype(DType::F32)?.to_vec1::<f32>()
        };
        Ok(Self {
            tower,
            visual_projection,
            concept_bank: l2_normalize(&vb.get((CONCEPTS, p), "concept_embeds")?)?,
            special_care_bank: l2_normalize(&vb.get((SPECIAL_CARE, p), "special_care_embeds")?)?,
            concept_thresholds: thresholds("concept_embeds_weights", CONCEPTS)?,
            special_thresholds: thresholds("special_care_embeds_weights", SPECIAL_CARE)?,
        })
    }
}

/// A loaded safety checker with its image processor.
#[derive(Debug)]
pub struct SafetyChecker {
    /// Networks and embeddings, on `device` in `dtype`.
    nets: Networks,
    /// The feature extractor's preprocessing.
    processor: ImageProcessor,
    /// The model's device: `pixel_values` are created here.
    device: Device,
    /// The model's dtype: `pixel_values` are cast to it, as diffusers does.
    dtype: DType,
}

impl SafetyChecker {
    /// Loads `safety_checker/` and `feature_extractor/` of the checkpoint at `dir`, on
    /// `device` in `dtype` (the model's).
    ///
    /// # Errors
    /// [`ModelError`] naming the missing file, unsupported config key or bad tensors.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        linear: LinearBackend,
    ) -> Result<Self, ModelError> {
        let config = SafetyCheckerConfig::from_json(&read_json_object(&dir.join("safety_checker/config.json"))?)?;
        let processor =
            ImageProcessor::from_json(&read_json_object(&dir.join("feature_extractor/preprocessor_config.json"))?)?;
        let size = config.vision.image_size;
        let produces = match (processor.crop, processor.resize) {
            (Some(crop), _) => Some(crop),
            (None, Some(ResizeTarget::Exact { height, width })) => Some((height, width)),
            (None, _) => None,
        };
        if produces != Some((size, size)) {
            return Err(ModelError::UnsupportedConfig {
                component: "feature_extractor",
                key: "crop_size".into(),
                message: format!(
                    "the preprocessing does not produce the {size}×{size} images the checker's vision tower takes"
                ),
            });
        }
        let files = find_weight_files(&dir.join("safety_checker"), "model", variant)
            .or_else(|_| find_weight_files(&dir.join("safety_checker"), "pytorch_model", variant))?;
        let nets = load_component("safety_checker", &files, dtype, device, IGNORABLE, |vb| {
            Networks::new(&config, linear, vb)
        })?;
        Ok(Self { nets, processor, device: device.clone(), dtype })
    }

    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Thresholds `(special_care, concepts)` as float32 (the stored values in the model dtype).
    pub fn thresholds(&self) -> (&[f32], &[f32]) {
        (&self.nets.special_thresholds, &self.nets.concept_thresholds)
    }

    /// Cosine similarities `(special_care, concepts)` of already preprocessed `pixel_values`
    /// `[3, S, S]` (float32; cast to the model dtype here, as diffusers does).
    ///
    /// # Errors
    /// Compute failures.
    pub fn cosines(&self, pixel_values: &[f32], size: (usize, usize)) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let x = Tensor::from_slice(pixel_values, (1, 3, size.0, size.1), &self.device)?.to_dtype(self.dtype)?;
        let pooled = self.nets.tower.forward(&x)?;
        let embeds = l2_normalize(&self.nets.visual_projection.forward(&pooled)?)?;
        let cos = |bank: &Tensor| -> candle_core::Result<Vec<f32>> {
            embeds.matmul(&bank.t()?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        Ok((cos(&self.nets.special_care_bank)?, cos(&self.nets.concept_bank)?))
    }

    /// Checks one output image (the uint8 image diffusers' `postprocess` makes).
    ///
    /// # Errors
    /// Compute failures.
    pub fn check(&self, image: &RgbImage) -> Result<SafetyReport, ModelError> {
        let (pixels, h, w) = self.processor.pixel_values(image)?;
        let (special, concepts) = self.cosines(&pixels, (h, w))?;
        Ok(decide(&special, &self.nets.special_thresholds, &concepts, &self.nets.concept_thresholds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).expect("json")
    }

    #[test]
    fn rounding_and_the_special_care_adjustment_decide_as_diffusers() {
        let thr = [0.2f32; 3];
        let cthr = [0.2f32; 17];
        let mut concepts = [0.1f32; 17];
        // 0.0004 above the threshold rounds to 0.0: not flagged.
        concepts[3] = 0.2004;
        let r = decide(&[0.1; 3], &thr, &concepts, &cthr);
        assert!(!r.nsfw && r.concept_scores[3] == 0.0, "{r:?}");
        concepts[3] = 0.2006;
        assert!(decide(&[0.1; 3], &thr, &concepts, &cthr).nsfw);
        // A special-care hit adds 0.01 to everything checked after it.
        concepts[3] = 0.191;
        let r = decide(&[0.25, 0.195, 0.1], &thr, &concepts, &cthr);
        assert_eq!((r.special_care.clone(), r.bad_concepts.clone(), r.nsfw), (vec![0, 1], vec![3], true), "{r:?}");
        let r = decide(&[0.1; 3], &thr, &concepts, &cthr);
        assert!(!r.nsfw, "{r:?}");
    }

    #[test]
    fn both_preprocessor_config_forms_mean_the_same() {
        let modern = ImageProcessor::from_json(&json(
            r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
                "do_normalize": true, "do_rescale": true, "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": 224}}"#,
        ))
        .expect("modern");
        let legacy = ImageProcessor::from_json(&json(
            r#"{"crop_size": 224, "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_resize": true,
                "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
        ))
        .expect("legacy");
        assert_eq!(modern, legacy);
        assert_eq!(modern.resize, Some(ResizeTarget::ShortestEdge(224)));
        assert_eq!(modern.resized_size(96, 40), (537, 224));
        assert_eq!(modern.resized_size(40, 96), (224, 537));
        assert_eq!(modern.resized_size(512, 512), (224, 224));
    }

    #[test]
    fn unsupported_preprocessing_is_named() {
        let e = ImageProcessor::from_json(&json(r#"{"resample": 2}"#)).expect_err("bilinear").to_string();
        assert!(e.contains("resample"), "{e}");
        let e = ImageProcessor::from_json(&json(r#"{"do_pad": true}"#)).expect_err("pad").to_string();
        assert!(e.contains("do_pad"), "{e}");
        let e = ImageProcessor::from_json(&json(r#"{"brand_new": 1}"#)).expect_err("unknown").to_string();
        assert!(e.contains("brand_new"), "{e}");
        let e = ImageProcessor::from_json(&json(r#"{"size": 200, "crop_size": 224}"#)).expect_err("crop").to_string();
        assert!(e.contains("crop_size"), "{e}");
    }

    #[test]
    fn model_index_names_the_checker_as_diffusers_reads_it() {
        let real = json(
            r#"{"_class_name": "StableDiffusionInstructPix2PixPipeline", "requires_safety_checker": false,
                "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                "feature_extractor": ["transformers", "CLIPImageProcessor"]}"#,
        );
        assert!(checkpoint_has_checker(&real).expect("valid"), "requires_safety_checker does not matter");
        let none = json(r#"{"safety_checker": [null, null], "feature_extractor": [null, null]}"#);
        assert!(!checkpoint_has_checker(&none).expect("valid"));
        assert!(!checkpoint_has_checker(&json("{}")).expect("valid"));
        let lonely = json(r#"{"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}"#);
        assert!(checkpoint_has_checker(&lonely).expect_err("no extractor").to_string().contains("feature_extractor"));
    }

    #[test]
    fn checker_config_uses_the_top_level_projection_dim() {
        let c = SafetyCheckerConfig::from_json(&json(
            r#"{"projection_dim": 768, "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 512}}"#,
        ))
        .expect("config");
        assert_eq!((c.projection_dim, c.vision.image_size, c.vision.patches_per_side()), (768, 224, 16));
        assert_eq!(c.vision.activation, ClipActivation::QuickGelu);
        let e = SafetyCheckerConfig::from_json(&json(r#"{"vision_config": {"hidden_act": "relu"}}"#))
            .expect_err("relu")
            .to_string();
        assert!(e.contains("hidden_act"), "{e}");
    }
}
