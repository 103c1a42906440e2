//! diffusers' `AutoencoderKL`: an encoder whose posterior **mean** (`latent_dist.mode()`,
//! what InstructPix2Pix conditions on, unscaled) we expose — candle-transformers keeps it
//! private — and a decoder.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::VaeAttention;
use super::blocks::{Conv2d, Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D, conv2d};
use super::norm::GroupNorm;
use crate::config::VaeConfig;
use crate::kernels::Kernels;

/// GroupNorm epsilon of every VAE norm (hard-coded in diffusers).
const VAE_EPS: f64 = 1e-6;

fn vae_resnet(in_c: usize, out_c: usize, groups: usize, kernels: Kernels, vb: VarBuilder) -> Result<ResnetBlock2D> {
    let spec = ResnetSpec {
        in_channels: in_c,
        out_channels: out_c,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
        conv: kernels.conv,
    };
    ResnetBlock2D::new(spec, vb)
}

/// `UNetMidBlock2D` without time embedding: resnet, optional self-attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, with_attention: bool, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnets: [
                vae_resnet(channels, channels, groups, kernels, vb.pp("resnets").pp(0))?,
                vae_resnet(channels, channels, groups, kernels, vb.pp("resnets").pp(1))?,
            ],
            attention: with_attention
                .then(|| VaeAttention::new(channels, groups, kernels, vb.pp("attentions").pp(0)))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(c: &VaeConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let channels = &c.block_out_channels;
        let mut blocks = Vec::new();
        let mut out_c = channels[0];
        for (i, &block_c) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_c = out_c;
            out_c = block_c;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    vae_resnet(
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        c.norm_num_groups,
                        kernels,
                        vb.pp("resnets").pp(j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = (i + 1 < channels.len())
                .then(|| Downsample2D::new(out_c, 0, kernels.conv, vb.pp("downsamplers").pp(0)))
                .transpose()?;
            blocks.push((resnets, down));
        }
        let last = *channels.last().expect("config has at least one block");
        Ok(Self {
            conv_in: conv2d(c.in_channels, channels[0], 3, 1, 1, kernels.conv, vb.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(last, c.norm_num_groups, c.mid_block_add_attention, kernels, vb.pp("mid_block"))?,
            norm_out: GroupNorm::load(c.norm_num_groups, last, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * c.latent_channels, 3, 1, 1, kernels.conv, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = down {
                x = d.forward(&x)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(c: &VaeConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut out_c = reversed[0];
        for (i, &block_c) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev = out_c;
            out_c = block_c;
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    vae_resnet(
                        if j == 0 { prev } else { out_c },
                        out_c,
                        c.norm_num_groups,
                        kernels,
                        vb.pp("resnets").pp(j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = (i + 1 < reversed.len())
                .then(|| Upsample2D::new(out_c, kernels.conv, vb.pp("upsamplers").pp(0)))
                .transpose()?;
            blocks.push((resnets, up));
        }
        let first = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(c.latent_channels, reversed[0], 3, 1, 1, kernels.conv, vb.pp("conv_in"))?,
            mid: MidBlock::new(reversed[0], c.norm_num_groups, c.mid_block_add_attention, kernels, vb.pp("mid_block"))?,
            blocks,
            norm_out: GroupNorm::load(c.norm_num_groups, first, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(first, c.out_channels, 3, 1, 1, kernels.conv, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = up {
                x = u.forward(&x, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

/// The variational autoencoder.
#[derive(Debug)]
pub struct AutoencoderKl {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

impl AutoencoderKl {
    /// Builds the VAE described by `config` from the weights under `vb`, running on `kernels`.
    pub fn new(config: &VaeConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let l = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(config, kernels, vb.pp("encoder"))?,
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(2 * l, 2 * l, 1, 0, 1, kernels.conv, vb.pp("quant_conv")))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(l, l, 1, 0, 1, kernels.conv, vb.pp("post_quant_conv")))
                .transpose()?,
            decoder: Decoder::new(config, kernels, vb.pp("decoder"))?,
        })
    }

    /// The config the network was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `vae.encode(image).latent_dist.mode()`: the posterior mean, **unscaled**. `image` is
    /// `[B, 3, H, W]` in [-1, 1].
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let mut moments = self.encoder.forward(image)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// `vae.decode(latents)` for latents already divided by the scaling factor; returns
    /// `[B, 3, H, W]`, nominally in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}
