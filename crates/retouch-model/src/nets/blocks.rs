//! Convolutional building blocks shared by the UNet and the VAE: resnets, down- and
//! up-samplers (diffusers' `ResnetBlock2D`, `Downsample2D`, `Upsample2D`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

pub use super::conv::Conv2d;
use super::elementwise;
use super::norm::GroupNorm;
use crate::kernels::ConvBackend;

/// A `k×k` convolution with bias, `padding` on every side and `stride`, run by `backend`.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    k: usize,
    padding: usize,
    stride: usize,
    backend: ConvBackend,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::load(in_c, out_c, k, padding, stride, backend, vb)
}

/// diffusers' `ResnetBlock2D` with the default time-embedding handling (added after conv1).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shape of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, `None` in the VAE.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// How the convolutions run.
    pub conv: ConvBackend,
}

impl ResnetBlock2D {
    /// Loads the block from `vb`.
    pub fn new(spec: ResnetSpec, vb: VarBuilder) -> Result<Self> {
        let ResnetSpec { in_channels, out_channels, temb_channels, groups, eps, output_scale_factor, conv } = spec;
        let norm1 = GroupNorm::load(groups, in_channels, eps, vb.pp("norm1"))?;
        let conv1 = conv2d(in_channels, out_channels, 3, 1, 1, conv, vb.pp("conv1"))?;
        let time_emb_proj =
            temb_channels.map(|t| candle_nn::linear(t, out_channels, vb.pp("time_emb_proj"))).transpose()?;
        let norm2 = GroupNorm::load(groups, out_channels, eps, vb.pp("norm2"))?;
        let conv2 = conv2d(out_channels, out_channels, 3, 1, 1, conv, vb.pp("conv2"))?;
        let conv_shortcut = (in_channels != out_channels)
            .then(|| conv2d(in_channels, out_channels, 1, 0, 1, conv, vb.pp("conv_shortcut")))
            .transpose()?;
        Ok(Self { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, output_scale_factor })
    }

    /// `x` is `[B, C, H, W]`; `temb` the time embedding, `[1, T]` (shared by the batch) or
    /// `[B, T]` (UNet only).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h = elementwise::add_per_channel(&h, &proj.forward(&temb.silu()?)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = elementwise::add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 { Ok(out) } else { out / self.output_scale_factor }
    }
}

/// diffusers' `Downsample2D` with a convolution. `padding = 0` means the VAE encoder's
/// asymmetric zero pad (right and bottom by one) before a stride-2, unpadded convolution.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    /// Loads `downsamplers.0` (its `conv`).
    pub fn new(channels: usize, padding: usize, backend: ConvBackend, vb: VarBuilder) -> Result<Self> {
        let conv = conv2d(channels, channels, 3, padding, 2, backend, vb.pp("conv"))?;
        Ok(Self { conv, pad_bottom_right: padding == 0 })
    }

    /// Halves the spatial size (rounding up).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour resize, then a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `upsamplers.0` (its `conv`).
    pub fn new(channels: usize, backend: ConvBackend, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, backend, vb.pp("conv"))? })
    }

    /// Resizes to `size` (the skip connection's size in the UNet; twice the input otherwise).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&elementwise::upsample_nearest2d(x, th, tw)?)
    }
}
