//! The CLIP text encoder: candle-transformers' `ClipTextTransformer`, which is exact for the
//! SD 1.x encoders (quick-GELU, LayerNorm eps 1e-5, causal mask, final LayerNorm), built from
//! the checkpoint's own config and accepting tensor names with or without the `text_model.`
//! prefix (older transformers wrote it, newer ones do not).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};

use crate::config::TextEncoderConfig;

/// Tensor name used to detect the `text_model.` prefix.
const PROBE: &str = "embeddings.token_embedding.weight";

/// The text encoder: token ids `[B, 77]` → `last_hidden_state` `[B, 77, hidden]`.
#[derive(Debug)]
pub struct TextEncoder {
    inner: ClipTextTransformer,
    config: TextEncoderConfig,
}

impl TextEncoder {
    /// Builds the encoder from `vb` (the root of `text_encoder/model.safetensors`).
    pub fn new(config: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor(&format!("text_model.{PROBE}")) { vb.pp("text_model") } else { vb };
        let cfg = ClipTextConfig {
            vocab_size: config.vocab_size,
            embed_dim: config.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: config.intermediate_size,
            max_position_embeddings: config.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            projection_dim: config.hidden_size,
        };
        Ok(Self { inner: ClipTextTransformer::new(vb, &cfg)?, config: config.clone() })
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    /// Encodes `[B, L]` token ids (u32) into `[B, L, hidden]` (after the final LayerNorm).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.inner.forward_with_mask(ids, usize::MAX)
    }
}
