//! diffusers' `UNet2DConditionModel`, built from its config: the 8-channel `conv_in`,
//! sinusoidal time embedding computed in float32 from fractional timesteps, down blocks with
//! optional cross-attention, the cross-attention mid block, up blocks with skip connections
//! (resized to the skip's size, so odd latent sizes work) and the output head.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::attention::{SpatialTransformer, SpatialTransformerSpec};
use super::blocks::{Conv2d, Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D, conv2d};
use super::norm::GroupNorm;
use crate::config::UNetConfig;
use crate::kernels::Kernels;

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample2D>,
}

/// The denoising network.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: SpatialTransformer,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet described by `config` from the weights under `vb`, running on `kernels`.
    pub fn new(config: &UNetConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let ch0 = c.down_blocks[0].out_channels;
        let temb = ch0 * 4;
        let n = c.down_blocks.len();
        let resnet = |in_c: usize, out_c: usize, scale: f64| ResnetSpec {
            in_channels: in_c,
            out_channels: out_c,
            temb_channels: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: scale,
            conv: kernels.conv,
        };
        let transformer = |channels: usize, heads: usize, layers: usize| SpatialTransformerSpec {
            channels,
            heads,
            layers,
            context_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
            kernels,
            upcast_attention: c.upcast_attention,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch0;
        for (i, block) in c.down_blocks.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_c = out_c;
            out_c = block.out_channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..block.layers {
                let from = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(resnet(from, out_c, 1.0), vb.pp("resnets").pp(j))?);
                if let Some(layers) = block.transformer_layers {
                    attentions.push(SpatialTransformer::new(
                        transformer(out_c, block.heads, layers),
                        vb.pp("attentions").pp(j),
                    )?);
                }
            }
            let downsampler = (i + 1 < n)
                .then(|| Downsample2D::new(out_c, c.downsample_padding, kernels.conv, vb.pp("downsamplers").pp(0)))
                .transpose()?;
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let last = c.down_blocks[n - 1].out_channels;
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock2D::new(resnet(last, last, c.mid_block_scale_factor), mid.pp("resnets").pp(0))?,
            ResnetBlock2D::new(resnet(last, last, c.mid_block_scale_factor), mid.pp("resnets").pp(1))?,
        ];
        let mid_attention = SpatialTransformer::new(
            transformer(last, c.mid_heads, c.mid_transformer_layers),
            mid.pp("attentions").pp(0),
        )?;

        // Up block i works at the resolution of down block n-1-i; its resnets consume the skip
        // tensors of that down block in reverse (the last one also the previous block's).
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = last;
        for (i, block) in c.up_blocks.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let out_c = block.out_channels;
            let skip_in = c.down_blocks[(n - 1 - i).saturating_sub(1)].out_channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..block.layers {
                let res_skip = if j + 1 == block.layers { skip_in } else { out_c };
                let res_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(resnet(res_in + res_skip, out_c, 1.0), vb.pp("resnets").pp(j))?);
                if let Some(layers) = block.transformer_layers {
                    attentions.push(SpatialTransformer::new(
                        transformer(out_c, block.heads, layers),
                        vb.pp("attentions").pp(j),
                    )?);
                }
            }
            let upsampler =
                (i + 1 < n).then(|| Upsample2D::new(out_c, kernels.conv, vb.pp("upsamplers").pp(0))).transpose()?;
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
            prev_out = out_c;
        }

        Ok(Self {
            config: config.clone(),
            conv_in: conv2d(c.in_channels, ch0, 3, 1, 1, kernels.conv, vb.pp("conv_in"))?,
            time_linear_1: candle_nn::linear(ch0, temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: candle_nn::linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            down_blocks,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNorm::load(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch0, c.out_channels, 3, 1, 1, kernels.conv, vb.pp("conv_out"))?,
        })
    }

    /// The config the network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// diffusers' `get_timestep_embedding` for one (possibly fractional) timestep, in float32
    /// with diffusers' operation order, as a `[1, C]` tensor.
    fn time_projection(&self, timestep: f32, device: &Device) -> Result<Tensor> {
        let dim = self.config.down_blocks[0].out_channels;
        let half = dim / 2;
        let ln_max_period = -(10000f64.ln() as f32);
        let denominator = (half as f64 - self.config.freq_shift) as f32;
        let args: Vec<f32> = (0..half).map(|i| timestep * ((ln_max_period * i as f32) / denominator).exp()).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let mut emb = if self.config.flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
        emb.resize(dim, 0.0);
        Tensor::from_vec(emb, (1, dim), device)
    }

    /// Predicts the noise. `sample` is `[B, in_channels, h, w]`, `timestep` shared by the
    /// batch, `context` the text embeddings `[B, 77, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timestep: f32, context: &Tensor) -> Result<Tensor> {
        let dtype = sample.dtype();
        // The timestep is shared by the batch: embed and project it once, as one row, and let
        // each resnet broadcast it (also keeps every image's maths independent of its batch).
        let t_emb = self.time_projection(timestep, sample.device())?.to_dtype(dtype)?;
        let emb = self.time_linear_2.forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;

        let sample = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = self.mid_resnets[0].forward(&x, Some(&emb))?;
        x = self.mid_attention.forward(&x, context)?;
        x = self.mid_resnets[1].forward(&x, Some(&emb))?;

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("the UNet's skip stack matches its blocks; this is a bug");
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
            }
            if let Some(up) = &block.upsampler {
                let next_skip = skips.last().expect("an upsampler is followed by more skips; this is a bug");
                let (_, _, h, w) = next_skip.dims4()?;
                x = up.forward(&x, Some((h, w)))?;
            }
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }

    /// The dtype of the activations (the weights' dtype, or f32 when bf16 products run on the
    /// CPU).
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }
}
