//! The networks, written on candle-nn to mirror diffusers module by module.
//!
//! Module and tensor names follow diffusers' state dicts exactly, so a checkpoint's weights
//! load by name. Where candle-transformers' Stable Diffusion modules deviate from diffusers
//! (tanh-GELU in GEGLU, `norm_num_groups` ignored in resnets, no VAE mean, presets only) the
//! modules here are our own, and so are the CLIP towers ([`clip`]: candle-transformers' lacks
//! `gelu` and the config's LayerNorm eps, runs its projections on candle's matmul only, and
//! invents a random class embedding when the vision checkpoint has none).

pub mod activation;
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
