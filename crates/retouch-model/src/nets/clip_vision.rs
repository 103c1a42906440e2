//! The CLIP vision tower of the safety checker: transformers' `CLIPVisionModel`, returning its
//! `pooler_output` (the class token after the last layer, through `post_layernorm`).
//!
//! Our own module rather than candle-transformers' `ClipVisionTransformer`, which deviates
//! from transformers where it matters here: it implements only quick-GELU (a config may say
//! `gelu`), hard-codes LayerNorm eps 1e-5 instead of the config's `layer_norm_eps`, and
//! silently draws a **random** class embedding when the checkpoint has none (a misnamed
//! tensor would then load "fine" and flag at random). Everything else follows transformers
//! 5.24: a bias-free patch convolution (written as the equivalent matmul over flattened
//! patches, stride = kernel), `[class] + patches` plus learned positions, `pre_layrnorm`
//! (sic), pre-LN encoder layers (multi-head attention with biases, softmax over `QKᵀ·d^-½`,
//! MLP `fc1 → activation → fc2`), and `post_layernorm` on the class token.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

/// The activation of the encoder MLPs (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x · σ(1.702 x)` (every SD 1.x safety checker).
    QuickGelu,
    /// The exact, erf-based GELU.
    Gelu,
}

/// The tower's shape (transformers `CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    /// Width of the tokens.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input side in pixels (the crop size of the preprocessing).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// MLP activation.
    pub activation: ClipActivation,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches along one side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: ((h / c.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| y.reshape((b, t, self.heads, h / self.heads))?.transpose(1, 2)?.contiguous();
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = weights.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, t, h))?;
        self.out.forward(&y)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    attention: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn new(c: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attention: Attention::new(c, vb.pp("self_attn"))?,
            layer_norm2: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?,
            activation: c.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.forward(&self.layer_norm1.forward(x)?)?)?;
        let y = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let y = match self.activation {
            ClipActivation::QuickGelu => (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?,
            ClipActivation::Gelu => y.gelu_erf()?,
        };
        x + self.fc2.forward(&y)?
    }
}

/// `CLIPVisionModel` up to its pooled output.
#[derive(Debug)]
pub struct ClipVisionTower {
    /// The patch convolution's weight flattened to `[hidden, channels · patch²]`.
    patch_weight: Tensor,
    /// `[1, 1, hidden]`.
    class_embedding: Tensor,
    /// `[1, patches + 1, hidden]`.
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionTower {
    /// Builds the tower from `vb` rooted at the `CLIPVisionModel` (its `embeddings`,
    /// `pre_layrnorm`, `encoder`, `post_layernorm`).
    pub fn new(c: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let positions = c.patches_per_side().pow(2) + 1;
        let emb = vb.pp("embeddings");
        let patch_weight = emb.pp("patch_embedding").get((h, ch, p, p), "weight")?.reshape((h, ch * p * p))?;
        let class_embedding = emb.get(h, "class_embedding")?.reshape((1, 1, h))?;
        let position_embedding = emb.pp("position_embedding").get((positions, h), "weight")?.unsqueeze(0)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(c, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_layrnorm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            config: c.clone(),
        })
    }

    /// `pixel_values` `[B, C, S, S]` → `pooler_output` `[B, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, hgt, wid) = pixel_values.dims4()?;
        let (p, n) = (c.patch_size, c.patches_per_side());
        if (ch, hgt, wid) != (c.num_channels, c.image_size, c.image_size) {
            candle_core::bail!(
                "the vision tower takes [B, {}, {s}, {s}], got [{b}, {ch}, {hgt}, {wid}]",
                c.num_channels,
                s = c.image_size
            );
        }
        // conv2d(kernel = stride = p, no bias) as a matmul: each patch flattened as (c, ky, kx),
        // patches in row-major order, like `flatten(2).transpose(1, 2)` of the convolution.
        let patches = pixel_values
            .reshape((b, ch, n, p, n, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, n * n, ch * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let class = self.class_embedding.broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&class, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let pooled = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.post_layernorm.forward(&pooled.contiguous()?)
    }
}

/// Rows of `x` `[B, N]` divided by their L2 norm (at least 1e-12): `F.normalize(x)`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}
