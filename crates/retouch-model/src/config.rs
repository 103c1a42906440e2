//! diffusers / transformers `config.json` files → typed network configs.
//!
//! Every network is built from its checkpoint's config, never from a preset. Reading is
//! strict: each key is either understood (and its value checked against what the networks
//! here implement) or explicitly ignored because it cannot change inference (dropout, sample
//! size, metadata). A key set to something unimplemented — a block type, an option — and, for
//! the diffusers configs, a key never seen before is an error that names it: silently building
//! a different network is the one outcome worse than refusing.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;
use crate::nets::clip::ClipActivation;

/// Reads a JSON object file. Python's `json` module (which writes every diffusers config)
/// spells non-finite floats as the bare tokens `NaN`, `Infinity` and `-Infinity` — a saved
/// `DPMSolverMultistepScheduler` config has `"lambda_min_clipped": -Infinity` — which strict
/// JSON lacks: such tokens are read as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile(path.to_path_buf())
        } else {
            ModelError::Io { path: path.to_path_buf(), source }
        }
    })?;
    let parsed = serde_json::from_str::<Value>(&text).or_else(|e| match quote_python_non_finite(&text) {
        Some(quoted) => serde_json::from_str::<Value>(&quoted).map_err(|_| e),
        None => Err(e),
    });
    match parsed {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ModelError::InvalidConfig { path: path.to_path_buf(), message: "not a JSON object".into() }),
        Err(e) => Err(ModelError::InvalidConfig { path: path.to_path_buf(), message: e.to_string() }),
    }
}

/// `text` with Python's bare `NaN` / `Infinity` / `-Infinity` tokens (outside strings) turned
/// into JSON strings; `None` when there are none.
fn quote_python_non_finite(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut changed = false;
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            changed = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    changed.then_some(out)
}

/// A config object being read key by key; remembers which keys were looked at.
pub(crate) struct ConfigReader<'a> {
    component: &'static str,
    map: &'a Map<String, Value>,
    seen: RefCell<BTreeSet<String>>,
}

impl<'a> ConfigReader<'a> {
    pub(crate) fn new(component: &'static str, map: &'a Map<String, Value>) -> Self {
        Self { component, map, seen: RefCell::new(BTreeSet::new()) }
    }

    pub(crate) fn err(&self, key: &str, message: impl Into<String>) -> ModelError {
        ModelError::UnsupportedConfig { component: self.component, key: key.to_string(), message: message.into() }
    }

    /// The value of `key`, `None` when absent or null.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.seen.borrow_mut().insert(key.to_string());
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub(crate) fn ignore(&self, keys: &[&str]) {
        let mut seen = self.seen.borrow_mut();
        for k in keys {
            seen.insert((*k).to_string());
        }
    }

    pub(crate) fn usize(&self, key: &str, default: Option<usize>) -> Result<usize, ModelError> {
        match self.get(key) {
            None => default.ok_or_else(|| self.err(key, "is required")),
            Some(v) => as_usize(v).ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub(crate) fn f64(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected a boolean, found {v}"))),
        }
    }

    pub(crate) fn string(&self, key: &str, default: &str) -> Result<String, ModelError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// A list of strings (block types).
    pub(crate) fn strings(&self, key: &str, default: &[&str]) -> Result<Vec<String>, ModelError> {
        match self.get(key) {
            None => Ok(default.iter().map(|s| (*s).to_string()).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| self.err(key, format!("expected strings, found {v}")))
                })
                .collect(),
            Some(v) => Err(self.err(key, format!("expected a list of strings, found {v}"))),
        }
    }

    /// An integer applied to every block, or one integer per block.
    pub(crate) fn per_block(&self, key: &str, blocks: usize, default: Option<usize>) -> Result<Vec<usize>, ModelError> {
        match self.get(key) {
            None => default.map(|d| vec![d; blocks]).ok_or_else(|| self.err(key, "is required")),
            Some(Value::Array(items)) => {
                if items.len() != blocks {
                    return Err(self.err(key, format!("has {} entries for {blocks} blocks", items.len())));
                }
                items
                    .iter()
                    .map(|v| as_usize(v).ok_or_else(|| self.err(key, format!("expected integers, found {v}"))))
                    .collect()
            }
            Some(v) => as_usize(v)
                .map(|n| vec![n; blocks])
                .ok_or_else(|| self.err(key, format!("expected an integer or a list, found {v}"))),
        }
    }

    /// The key must be absent or null.
    pub(crate) fn null(&self, key: &str) -> Result<(), ModelError> {
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(self.err(key, format!("{v} is not supported (only null)"))),
        }
    }

    /// The key must be absent (taking `default`) or one of `supported`.
    pub(crate) fn one_of(&self, key: &str, default: &str, supported: &[&str]) -> Result<String, ModelError> {
        let value = self.string(key, default)?;
        if supported.contains(&value.as_str()) {
            Ok(value)
        } else {
            Err(self.err(key, format!("{value:?} is not supported (supported: {supported:?})")))
        }
    }

    /// A boolean option of which only `expected` is implemented.
    pub(crate) fn bool_is(&self, key: &str, default: bool, expected: bool) -> Result<(), ModelError> {
        if self.bool(key, default)? == expected {
            Ok(())
        } else {
            Err(self.err(key, format!("{} is not supported", !expected)))
        }
    }

    /// Fails on any key not read or ignored, except `_`-prefixed metadata.
    pub(crate) fn finish(self) -> Result<(), ModelError> {
        let seen = self.seen.borrow();
        match self.map.keys().find(|k| !k.starts_with('_') && !seen.contains(k.as_str())) {
            Some(unknown) => Err(self.err(unknown, "unknown key; refusing to guess how it changes the network")),
            None => Ok(()),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|n| n as usize).or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as usize))
}

/// One down block of the UNet and the up block that mirrors its resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetBlockConfig {
    /// Output channels of the block.
    pub out_channels: usize,
    /// Resnets in the down block (the up block has one more).
    pub layers: usize,
    /// Transformer layers per attention, or `None` for a block without cross-attention.
    pub transformer_layers: Option<usize>,
    /// Attention heads (diffusers' `num_attention_heads`, historically `attention_head_dim`).
    pub heads: usize,
}

/// `UNet2DConditionModel` config, restricted to what InstructPix2Pix-family checkpoints use.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// Input channels (8 for InstructPix2Pix: noisy latents + image latents).
    pub in_channels: usize,
    /// Output channels (the predicted noise).
    pub out_channels: usize,
    /// `center_input_sample`: map the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Timestep embedding: `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    pub freq_shift: f64,
    /// Down blocks, in order.
    pub down_blocks: Vec<UNetBlockConfig>,
    /// Up blocks, in order (from the lowest resolution): whether each has cross-attention,
    /// and its transformer layers / heads / resnets.
    pub up_blocks: Vec<UNetBlockConfig>,
    /// Mid block transformer layers and heads.
    pub mid_transformer_layers: usize,
    /// Mid block heads.
    pub mid_heads: usize,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block resnets.
    pub mid_block_scale_factor: f64,
    /// GroupNorm groups everywhere.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of resnets and the output norm.
    pub norm_eps: f64,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
    /// Linear instead of 1×1-conv projections around the transformers.
    pub use_linear_projection: bool,
    /// `upcast_attention`: attention scores in float32 even when the model computes in f16/bf16
    /// (SD 1.5 and InstructPix2Pix: false). The CPU computes them in float32 either way.
    pub upcast_attention: bool,
}

impl UNetConfig {
    /// Parses `unet/config.json`.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedConfig`] naming the first key this implementation cannot honour.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ModelError> {
        let r = ConfigReader::new("unet", map);
        r.ignore(&["sample_size", "dropout", "addition_embed_type_num_heads"]);
        let down_types = r.strings(
            "down_block_types",
            &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        )?;
        let up_types = r.strings(
            "up_block_types",
            &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        )?;
        let n = down_types.len();
        if n == 0 || up_types.len() != n {
            return Err(r.err("up_block_types", format!("{} up blocks for {n} down blocks", up_types.len())));
        }
        let block_out_channels = r.per_block("block_out_channels", n, None)?;
        if !matches!(r.get("block_out_channels"), Some(Value::Array(_))) {
            return Err(r.err("block_out_channels", "expected a list"));
        }
        let layers_per_block = r.per_block("layers_per_block", n, Some(2))?;
        let head_source =
            if r.get("num_attention_heads").is_some() { "num_attention_heads" } else { "attention_head_dim" };
        let heads = r.per_block(head_source, n, Some(8))?;
        r.ignore(&["attention_head_dim", "num_attention_heads"]);
        let transformer_layers = match r.get("transformer_layers_per_block") {
            Some(Value::Array(items)) if items.iter().any(Value::is_array) => {
                return Err(r.err("transformer_layers_per_block", "nested lists are not supported"));
            }
            _ => r.per_block("transformer_layers_per_block", n, Some(1))?,
        };
        r.null("reverse_transformer_layers_per_block")?;
        if let Some(v) = r.get("cross_attention_dim")
            && !v.is_number()
        {
            return Err(r.err("cross_attention_dim", "per-block cross-attention widths are not supported"));
        }
        let cross_attention_dim = r.usize("cross_attention_dim", Some(1280))?;
        match r.get("only_cross_attention") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Array(v)) if v.iter().all(|b| b == &Value::Bool(false)) => {}
            Some(v) => return Err(r.err("only_cross_attention", format!("{v} is not supported"))),
        }

        let cross = |kind: &str, key: &str| -> Result<bool, ModelError> {
            match kind {
                "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
                "DownBlock2D" | "UpBlock2D" => Ok(false),
                other => Err(r.err(key, format!("block type {other:?} is not supported"))),
            }
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in down_types.iter().enumerate() {
            if kind.starts_with("Up") || kind.contains("Up") {
                return Err(r.err("down_block_types", format!("{kind:?} is not a down block")));
            }
            let has_cross = cross(kind, "down_block_types")?;
            down_blocks.push(UNetBlockConfig {
                out_channels: block_out_channels[i],
                layers: layers_per_block[i],
                transformer_layers: has_cross.then_some(transformer_layers[i]),
                heads: heads[i],
            });
        }
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in up_types.iter().enumerate() {
            if kind.contains("Down") {
                return Err(r.err("up_block_types", format!("{kind:?} is not an up block")));
            }
            let has_cross = cross(kind, "up_block_types")?;
            let src = n - 1 - i;
            up_blocks.push(UNetBlockConfig {
                out_channels: block_out_channels[src],
                layers: layers_per_block[src] + 1,
                transformer_layers: has_cross.then_some(transformer_layers[src]),
                heads: heads[src],
            });
        }

        r.one_of("mid_block_type", "UNetMidBlock2DCrossAttn", &["UNetMidBlock2DCrossAttn"])?;
        r.bool_is("mid_block_only_cross_attention", false, false)?;
        r.one_of("act_fn", "silu", &["silu", "swish"])?;
        r.one_of("resnet_time_scale_shift", "default", &["default"])?;
        r.bool_is("resnet_skip_time_act", false, false)?;
        if r.f64("resnet_out_scale_factor", 1.0)? != 1.0 {
            return Err(r.err("resnet_out_scale_factor", "only 1.0 is supported"));
        }
        r.one_of("time_embedding_type", "positional", &["positional"])?;
        for key in [
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "time_cond_proj_dim",
            "class_embed_type",
            "num_class_embeds",
            "addition_embed_type",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "cross_attention_norm",
        ] {
            r.null(key)?;
        }
        r.bool_is("class_embeddings_concat", false, false)?;
        r.bool_is("dual_cross_attention", false, false)?;
        r.one_of("attention_type", "default", &["default"])?;
        for key in ["conv_in_kernel", "conv_out_kernel"] {
            if r.usize(key, Some(3))? != 3 {
                return Err(r.err(key, "only 3 is supported"));
            }
        }

        let config = Self {
            in_channels: r.usize("in_channels", Some(4))?,
            out_channels: r.usize("out_channels", Some(4))?,
            center_input_sample: r.bool("center_input_sample", false)?,
            flip_sin_to_cos: r.bool("flip_sin_to_cos", true)?,
            freq_shift: r.f64("freq_shift", 0.0)?,
            mid_transformer_layers: transformer_layers[n - 1],
            mid_heads: heads[n - 1],
            down_blocks,
            up_blocks,
            downsample_padding: r.usize("downsample_padding", Some(1))?,
            mid_block_scale_factor: r.f64("mid_block_scale_factor", 1.0)?,
            norm_num_groups: r.usize("norm_num_groups", Some(32))?,
            norm_eps: r.f64("norm_eps", 1e-5)?,
            cross_attention_dim,
            use_linear_projection: r.bool("use_linear_projection", false)?,
            upcast_attention: r.bool("upcast_attention", false)?,
        };
        r.finish()?;
        config.check_divisibility()?;
        Ok(config)
    }

    fn check_divisibility(&self) -> Result<(), ModelError> {
        let err =
            |key: &str, message: String| ModelError::UnsupportedConfig { component: "unet", key: key.into(), message };
        for b in &self.down_blocks {
            if b.out_channels % self.norm_num_groups != 0 {
                return Err(err(
                    "norm_num_groups",
                    format!("{} does not divide {} channels", self.norm_num_groups, b.out_channels),
                ));
            }
            if b.transformer_layers.is_some() && (b.heads == 0 || b.out_channels % b.heads != 0) {
                return Err(err(
                    "attention_head_dim",
                    format!("{} heads do not divide {} channels", b.heads, b.out_channels),
                ));
            }
        }
        Ok(())
    }

    /// Total down-sampling factor of the UNet (2^(blocks − 1)).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.down_blocks.len() - 1)
    }
}

/// `AutoencoderKL` config.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels per block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before the UNet sees them, divided before decoding.
    pub scaling_factor: f64,
    /// 1×1 conv after the encoder.
    pub use_quant_conv: bool,
    /// 1×1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// Self-attention in the mid blocks.
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Parses `vae/config.json`.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedConfig`] naming the first key this implementation cannot honour.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ModelError> {
        let r = ConfigReader::new("vae", map);
        // `force_upcast` asks for an fp32 VAE in fp16 pipelines; the SD 1.5 InstructPix2Pix
        // pipeline ignores it, and so do we (see docs/model.md).
        r.ignore(&["sample_size", "force_upcast"]);
        let down = r.strings("down_block_types", &["DownEncoderBlock2D"])?;
        let up = r.strings("up_block_types", &["UpDecoderBlock2D"])?;
        if let Some(bad) = down.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(r.err("down_block_types", format!("block type {bad:?} is not supported")));
        }
        if let Some(bad) = up.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(r.err("up_block_types", format!("block type {bad:?} is not supported")));
        }
        let block_out_channels = match r.get("block_out_channels") {
            Some(Value::Array(_)) => r.per_block("block_out_channels", down.len(), None)?,
            None => vec![64],
            Some(v) => {
                return Err(r.err("block_out_channels", format!("expected a list, found {v}")));
            }
        };
        if block_out_channels.len() != down.len() || up.len() != down.len() {
            return Err(r.err("up_block_types", "block lists of different lengths"));
        }
        r.one_of("act_fn", "silu", &["silu", "swish"])?;
        r.null("shift_factor")?;
        r.null("latents_mean")?;
        r.null("latents_std")?;
        let config = Self {
            in_channels: r.usize("in_channels", Some(3))?,
            out_channels: r.usize("out_channels", Some(3))?,
            layers_per_block: r.usize("layers_per_block", Some(1))?,
            latent_channels: r.usize("latent_channels", Some(4))?,
            norm_num_groups: r.usize("norm_num_groups", Some(32))?,
            scaling_factor: r.f64("scaling_factor", 0.18215)?,
            use_quant_conv: r.bool("use_quant_conv", true)?,
            use_post_quant_conv: r.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: r.bool("mid_block_add_attention", true)?,
            block_out_channels,
        };
        r.finish()?;
        if let Some(c) = config.block_out_channels.iter().find(|c| *c % config.norm_num_groups != 0) {
            return Err(r_err(
                "vae",
                "norm_num_groups",
                format!("{} does not divide {c} channels", config.norm_num_groups),
            ));
        }
        Ok(config)
    }

    /// Pixels per latent along each side: 2^(blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn r_err(component: &'static str, key: &str, message: String) -> ModelError {
    ModelError::UnsupportedConfig { component, key: key.into(), message }
}

/// The CLIP text encoder config (transformers `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoderConfig {
    /// Vocabulary size (49,408 for the real tokenizer).
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// MLP activation (`hidden_act`: quick-GELU for every SD 1.x encoder).
    pub activation: ClipActivation,
    /// Epsilon of every LayerNorm (1e-5).
    pub layer_norm_eps: f64,
}

impl TextEncoderConfig {
    /// Parses `text_encoder/config.json`. transformers configs carry many generic keys
    /// (generation settings, label maps), so unknown keys are not errors here; the keys that
    /// shape the maths are checked.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedConfig`] for an activation the encoder does not implement.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ModelError> {
        // A full CLIPConfig nests the text tower under `text_config`.
        let map = match map.get("text_config") {
            Some(Value::Object(inner)) => inner,
            _ => map,
        };
        let r = ConfigReader::new("text_encoder", map);
        let activation = ClipActivation::from_name(&r.one_of("hidden_act", "quick_gelu", &ClipActivation::NAMES)?);
        Ok(Self {
            vocab_size: r.usize("vocab_size", Some(49408))?,
            hidden_size: r.usize("hidden_size", Some(512))?,
            intermediate_size: r.usize("intermediate_size", Some(2048))?,
            num_hidden_layers: r.usize("num_hidden_layers", Some(12))?,
            num_attention_heads: r.usize("num_attention_heads", Some(8))?,
            max_position_embeddings: r.usize("max_position_embeddings", Some(77))?,
            activation,
            layer_norm_eps: r.f64("layer_norm_eps", 1e-5)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_unet() -> Map<String, Value> {
        serde_json::from_str(
            r#"{"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":8,
            "block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":768,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":8,"layers_per_block":2,
            "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "use_linear_projection":false,"upcast_attention":false}"#,
        )
        .expect("json")
    }

    #[test]
    fn python_non_finite_floats_read_as_strings_outside_json_strings() {
        let dir = std::env::temp_dir().join(format!("retouch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("scheduler_config.json");
        std::fs::write(
            &path,
            r#"{"lambda_min_clipped": -Infinity, "x": Infinity, "y": NaN, "note": "-Infinity \" NaN", "z": 1.5}"#,
        )
        .expect("write");
        let m = read_json_object(&path).expect("python json reads");
        assert_eq!(m["lambda_min_clipped"], "-Infinity");
        assert_eq!(m["x"], "Infinity");
        assert_eq!(m["y"], "NaN");
        assert_eq!(m["note"], "-Infinity \" NaN", "strings are left alone");
        assert_eq!(m["z"], 1.5);
        std::fs::write(&path, r#"{"a": Infinit}"#).expect("write");
        assert!(read_json_object(&path).is_err(), "anything else is still invalid JSON");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn parses_sd15_unet() {
        let c = UNetConfig::from_json(&sd15_unet()).expect("config");
        assert_eq!(c.in_channels, 8);
        assert_eq!(c.down_blocks.len(), 4);
        assert_eq!(c.down_blocks[3].transformer_layers, None);
        assert_eq!(c.up_blocks[0].transformer_layers, None);
        assert_eq!(c.up_blocks[1].out_channels, 1280);
        assert_eq!(c.up_blocks[3].out_channels, 320);
        assert_eq!(c.up_blocks[3].layers, 3);
        assert_eq!(c.mid_heads, 8);
    }

    #[test]
    fn rejects_unknown_block_types_and_keys_by_name() {
        let mut m = sd15_unet();
        m["down_block_types"][0] = Value::String("SimpleCrossAttnDownBlock2D".into());
        let e = UNetConfig::from_json(&m).expect_err("must fail").to_string();
        assert!(e.contains("down_block_types") && e.contains("SimpleCrossAttnDownBlock2D"), "{e}");

        let mut m = sd15_unet();
        m.insert("addition_embed_type".into(), Value::String("text_time".into()));
        let e = UNetConfig::from_json(&m).expect_err("must fail").to_string();
        assert!(e.contains("addition_embed_type"), "{e}");

        let mut m = sd15_unet();
        m.insert("brand_new_option".into(), Value::Bool(true));
        let e = UNetConfig::from_json(&m).expect_err("must fail").to_string();
        assert!(e.contains("brand_new_option"), "{e}");
    }
}
