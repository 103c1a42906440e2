//! The networks, written on candle-nn to mirror diffusers module by module.
//!
//! Module and tensor names follow diffusers' state dicts exactly, so a checkpoint's weights
//! load by name. Where candle-transformers' Stable Diffusion modules deviate from diffusers
//! (tanh-GELU in GEGLU, `norm_num_groups` ignored in resnets, no VAE mean, presets only) the
//! modules here are our own; the CLIP text transformer is candle-transformers' (exact), the
//! safety checker's CLIP vision tower our own ([`clip_vision`]: candle's lacks `gelu`, the
//! config's LayerNorm eps, and invents a random class embedding when the tensor is missing).

pub mod attention;
pub mod blocks;
pub mod clip;
pub mod clip_vision;
pub mod conv;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod unet;
pub mod vae;
