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
use candle_nn::{LayerNorm, VarBuilder};

use super::clip::{ClipActivation, ClipEncoder, EncoderSpec};
use crate::kernels::LinearBackend;

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

/// `CLIPVisionModel` up to its pooled output.
#[derive(Debug)]
pub struct ClipVisionTower {
    /// The patch convolution's weight flattened to `[hidden, channels · patch²]`.
    patch_weight: Tensor,
    /// `[1, 1, hidden]`.
    class_embedding: Tensor,
    /// `[1, patches + 1, hidden]`.
    position_embedding: Tensor,
    /// `pre_layrnorm` (sic).
    pre_layrnorm: LayerNorm,
    /// The layers ([`super::clip`], shared with the text encoder).
    encoder: ClipEncoder,
    /// `post_layernorm`, on the class token.
    post_layernorm: LayerNorm,
    /// The tower's shape.
    config: ClipVisionConfig,
}

impl ClipVisionTower {
    /// Builds the tower from `vb` rooted at the `CLIPVisionModel` (its `embeddings`,
    /// `pre_layrnorm`, `encoder`, `post_layernorm`), its projections run by `linear`.
    pub fn new(c: &ClipVisionConfig, linear: LinearBackend, vb: VarBuilder) -> Result<Self> {
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let positions = c.patches_per_side().pow(2) + 1;
        let emb = vb.pp("embeddings");
        let patch_weight = emb.pp("patch_embedding").get((h, ch, p, p), "weight")?.reshape((h, ch * p * p))?;
        let class_embedding = emb.get(h, "class_embedding")?.reshape((1, 1, h))?;
        let position_embedding = emb.pp("position_embedding").get((positions, h), "weight")?.unsqueeze(0)?;
        let spec = EncoderSpec {
            hidden_size: h,
            intermediate_size: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            activation: c.activation,
            layer_norm_eps: c.layer_norm_eps,
            linear,
        };
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_layrnorm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(&spec, vb.pp("encoder"))?,
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
        let x = self.encoder.forward(&self.pre_layrnorm.forward(&x)?, false)?;
        let pooled = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.post_layernorm.forward(&pooled.contiguous()?)
    }
}

/// Rows of `x` `[B, N]` divided by their L2 norm (at least 1e-12): `F.normalize(x)`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}
