//! CLIP transformers, our own: the pre-LN encoder both CLIP towers share ([`ClipEncoder`]) and
//! the text encoder built on it ([`TextEncoder`]); the safety checker's vision tower
//! ([`super::clip_vision`]) is built on the same encoder.
//!
//! Written after transformers 5.24's `CLIPTextModel` / `CLIPEncoder`: token plus learned
//! position embeddings; pre-LN layers (LayerNorm, multi-head self-attention with biases and
//! softmax over `QKᵀ·d^-½` — causal in the text tower —, residual, LayerNorm, MLP `fc1 →
//! activation → fc2`, residual); a final LayerNorm. The activation (`quick_gelu` or the exact
//! `gelu`) and the LayerNorm epsilon come from the checkpoint's config. Tensor names load with
//! or without the `text_model.` prefix (older transformers wrote it, newer ones do not).
//!
//! The projections are [`Linear`] layers, so on the CPU with oneDNN they are oneDNN's f32
//! products (weights packed at load) — candle-transformers' CLIP, which this replaces, ran them
//! on candle's matmul. The text encoder stays f32 with `--dtype bf16` (only the UNet and the
//! VAE take bf16 products). Attention here is small (77 tokens, or 257 patches) and runs in
//! f32 on candle's products, one head at a time, so a sequence's result never depends on what
//! shares its batch.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::linear::Linear;
use crate::config::TextEncoderConfig;
use crate::kernels::LinearBackend;

/// The activation of the encoder MLPs (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x · σ(1.702 x)` (every SD 1.x text encoder and safety checker).
    QuickGelu,
    /// The exact, erf-based GELU.
    Gelu,
}

impl ClipActivation {
    /// The `hidden_act` names transformers gives these activations.
    pub const NAMES: [&'static str; 2] = ["quick_gelu", "gelu"];

    /// The activation named `name` (one of [`Self::NAMES`]; anything else is quick-GELU, the
    /// default, and is rejected by the config readers before it gets here).
    pub fn from_name(name: &str) -> Self {
        if name == "gelu" { Self::Gelu } else { Self::QuickGelu }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// The shape of a [`ClipEncoder`] and how its projections run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EncoderSpec {
    /// Width of the tokens.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP activation.
    pub activation: ClipActivation,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// What runs the projections.
    pub linear: LinearBackend,
}

/// Multi-head self-attention with biased projections.
#[derive(Debug)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl SelfAttention {
    fn new(spec: &EncoderSpec, vb: VarBuilder) -> Result<Self> {
        let (h, backend) = (spec.hidden_size, spec.linear);
        Ok(Self {
            q: Linear::load(h, h, true, backend, vb.pp("q_proj"))?,
            k: Linear::load(h, h, true, backend, vb.pp("k_proj"))?,
            v: Linear::load(h, h, true, backend, vb.pp("v_proj"))?,
            out: Linear::load(h, h, true, backend, vb.pp("out_proj"))?,
            heads: spec.heads,
            scale: ((h / spec.heads) as f64).powf(-0.5),
        })
    }

    /// `x` `[B, T, hidden]`; `mask` `[T, T]` (f32) is added to every head's scores. Scores,
    /// softmax and the weighted sum are float32 whatever the model dtype (as candle-transformers'
    /// CLIP did), so f16 scores never overflow and the mask's lowest f32 stays representable.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| {
            y.reshape((b, t, self.heads, h / self.heads))?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = weights.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, t, h))?.to_dtype(x.dtype())?;
        self.out.forward(&y)
    }
}

/// One pre-LN encoder layer.
#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    attention: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn new(spec: &EncoderSpec, vb: VarBuilder) -> Result<Self> {
        let (h, m, eps) = (spec.hidden_size, spec.intermediate_size, spec.layer_norm_eps);
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            attention: SelfAttention::new(spec, vb.pp("self_attn"))?,
            layer_norm2: candle_nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: Linear::load(h, m, true, spec.linear, vb.pp("mlp").pp("fc1"))?,
            fc2: Linear::load(m, h, true, spec.linear, vb.pp("mlp").pp("fc2"))?,
            activation: spec.activation,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attention.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let y = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        x + self.fc2.forward(&self.activation.apply(&y)?)?
    }
}

/// transformers' `CLIPEncoder`: the layers under `encoder.layers.{i}`.
#[derive(Debug)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

impl ClipEncoder {
    /// Loads `spec.layers` layers from `vb` (the `encoder` of a tower).
    pub fn new(spec: &EncoderSpec, vb: VarBuilder) -> Result<Self> {
        let layers = (0..spec.layers).map(|i| EncoderLayer::new(spec, vb.pp("layers").pp(i))).collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Runs every layer over `x` `[B, T, hidden]`; with `causal`, token `i` attends to tokens
    /// `0..=i` only.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mask = if causal { Some(causal_mask(x.dim(1)?, x.device())?) } else { None };
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref())?;
        }
        Ok(x)
    }
}

/// `[T, T]`: 0 where key `j ≤` query `i`, the lowest f32 elsewhere (transformers' causal mask).
fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Tensor name used to detect the `text_model.` prefix.
const PROBE: &str = "embeddings.token_embedding.weight";

/// The text encoder: token ids `[B, 77]` → `last_hidden_state` `[B, 77, hidden]`.
#[derive(Debug)]
pub struct TextEncoder {
    /// `[vocab, hidden]`.
    token_embedding: candle_nn::Embedding,
    /// `[max_positions, hidden]`.
    position_embedding: Tensor,
    /// The layers.
    encoder: ClipEncoder,
    /// `final_layer_norm`.
    final_layer_norm: LayerNorm,
    /// The config the encoder was built from.
    config: TextEncoderConfig,
}

impl TextEncoder {
    /// Builds the encoder from `vb` (the root of `text_encoder/model.safetensors`), its
    /// projections run by `linear`.
    pub fn new(config: &TextEncoderConfig, linear: LinearBackend, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor(&format!("text_model.{PROBE}")) { vb.pp("text_model") } else { vb };
        let h = config.hidden_size;
        let spec = EncoderSpec {
            hidden_size: h,
            intermediate_size: config.intermediate_size,
            layers: config.num_hidden_layers,
            heads: config.num_attention_heads,
            activation: config.activation,
            layer_norm_eps: config.layer_norm_eps,
            linear,
        };
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(config.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: emb.pp("position_embedding").get((config.max_position_embeddings, h), "weight")?,
            encoder: ClipEncoder::new(&spec, vb.pp("encoder"))?,
            final_layer_norm: candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: config.clone(),
        })
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    /// Encodes `[B, L]` token ids (u32, `L` at most the position count) into `[B, L, hidden]`
    /// (after the final LayerNorm).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let len = ids.dim(D::Minus1)?;
        let x = self.token_embedding.forward(ids)?.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let x = self.encoder.forward(&x, true)?;
        self.final_layer_norm.forward(&x)
    }
}
