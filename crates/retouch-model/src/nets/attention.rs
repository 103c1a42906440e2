//! Attention: the UNet's spatial transformers (`Transformer2DModel`,
//! `BasicTransformerBlock`, GEGLU feed-forward with exact erf-GELU) and the VAE mid-block
//! self-attention.
//!
//! Three ways to compute `softmax(q·kᵀ/√d)·v`, chosen per model at load time
//! ([`crate::kernels`]) and per layer by what the layer allows:
//!
//! * **CPU, oneDNN** (`--dtype bf16`, or `--conv onednn` in f32): [`crate::onednn::attention`],
//!   the same slices, products in bf16 (or f32) with f32 scores and softmax, heads read and
//!   written in place.
//! * **CPU: exact float32.** Scores and softmax in float32 whatever the model dtype, the
//!   batch·heads dimension (and, for large images, the queries) processed in slices so the
//!   score matrix of a 512-pixel self-attention (4096 × 4096 per head) never exists for all
//!   heads at once. Parity with diffusers and batch invariance rest on this path.
//! * **GPU, matmul path: the model's dtype.** diffusers computes SD 1.5 attention in the
//!   model dtype (`upcast_attention: false` in its UNet config; cuBLAS accumulates f16/bf16
//!   products in float32, softmax accumulates in float32); so do we, scaling the queries first
//!   so no f16 score can overflow. A checkpoint with `upcast_attention: true` gets float32
//!   scores, as in diffusers. Slices are larger than on the CPU (bounded by
//!   [`GPU_SCORE_SLICE_BYTES`]).
//! * **GPU, FlashAttention-2** (feature `flash-attn`, f16/bf16, head sizes whose kernel is built:
//!   [`crate::kernels::FLASH_KERNEL_HEAD_SIZES`] — SD 1.5's 40/80/160 and the VAE's 512
//!   qualify): scores never leave the chip. A layer it cannot take uses the matmul path.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::blocks::{Conv2d, conv2d};
use super::conv::with_cpu_slice;
use super::elementwise;
use super::linear::Linear;
use super::norm::GroupNorm;
use crate::kernels::{AttentionBackend, Kernels, LinearBackend, flash_kernel_for};
use crate::onednn::Precision;

/// Upper bound on one slice of attention scores on the CPU, in bytes (float32). Below glibc's
/// largest mmap threshold (see the binary's allocator tuning), so a slice's scores reuse freed
/// heap memory instead of faulting in fresh pages, and small enough to stay mostly in the
/// last-level cache.
const SCORE_SLICE_BYTES: usize = 16 << 20;
/// Upper bound on one slice of attention scores on a GPU, in bytes: large enough that each
/// slice is a few big batched matrix products, small enough that a batch of 8 images at 512 px
/// (24 UNet rows × 8 heads × 4096² scores, 6.4 GB in f16) never needs the whole matrix at once.
pub const GPU_SCORE_SLICE_BYTES: usize = 512 << 20;
/// Fewest query rows per slice: keeps every score product on gemm's general kernel.
const MIN_QUERY_ROWS: usize = 256;

/// How one attention layer computes: the model's backend and whether the checkpoint asks for
/// float32 scores.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    /// The backend chosen for the model.
    pub backend: AttentionBackend,
    /// `upcast_attention`: scores in float32 even on a GPU.
    pub upcast: bool,
    /// What runs the projections.
    pub linear: LinearBackend,
}

impl AttentionSpec {
    /// The spec of a model running with `kernels`.
    pub fn new(kernels: Kernels, upcast: bool) -> Self {
        Self { backend: kernels.attention, upcast, linear: kernels.linear }
    }
}

/// Multi-head scaled dot-product attention on `[B, N, H·D]` projections.
fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, spec: AttentionSpec) -> Result<Tensor> {
    let head_dim = q.dim(2)? / heads;
    if spec.backend == AttentionBackend::Flash
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && flash_kernel_for(head_dim).is_some()
    {
        return flash(q, k, v, heads);
    }
    if let (true, AttentionBackend::OneDnn(precision)) = (q.device().is_cpu(), spec.backend) {
        return onednn_attention(q, k, v, heads, precision);
    }
    if q.device().is_cpu() {
        sliced_attention(q, k, v, heads, SCORE_SLICE_BYTES, DType::F32)
    } else {
        let compute = if spec.upcast { DType::F32 } else { q.dtype() };
        sliced_attention(q, k, v, heads, GPU_SCORE_SLICE_BYTES, compute)
    }
}

/// oneDNN's attention (`--dtype bf16` or `--conv onednn` on the CPU): the same slices as the f32
/// path, products in `precision`, scores and softmax in f32, no transposes.
fn onednn_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, precision: Precision) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let shape = crate::onednn::AttentionShape { images: b, queries: n, keys: m, heads, head_dim: inner / heads };
    // Per image (oneDNN's calls see one image each), f32 scores.
    let slices = score_slices((n, m), heads, 4, SCORE_SLICE_BYTES);
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (q, k, v) = (f32(q)?, f32(k)?, f32(v)?);
    let out = with_cpu_slice(&q, |q| {
        with_cpu_slice(&k, |k| with_cpu_slice(&v, |v| crate::onednn::attention(precision, (q, k, v), shape, slices)))
    })?;
    Tensor::from_vec(out, (b, n, inner), q.device())
}

/// FlashAttention-2 on `[B, N, H·D]` projections (viewed as `[B, N, H, D]`, its layout).
#[cfg(feature = "flash-attn")]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let view = |x: &Tensor, len: usize| x.contiguous()?.reshape((b, len, heads, d));
    let out = candle_flash_attn::flash_attn(&view(q, n)?, &view(k, m)?, &view(v, m)?, (d as f32).powf(-0.5), false)?;
    out.reshape((b, n, inner))
}

#[cfg(not(feature = "flash-attn"))]
fn flash(_: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
    candle_core::bail!("flash attention asked of a build without the `flash-attn` feature; this is a bug")
}

/// How attention scores of `n` queries × `m` keys (`score_bytes` each) are cut to stay within
/// `budget` bytes: `(heads per slice, at most `heads`; query rows per chunk)` — several heads at
/// a time when a head's scores fit, else one head and equal chunks of at least
/// [`MIN_QUERY_ROWS`] queries. The chunks depend on `n` and `m` only.
pub(crate) fn score_slices((n, m): (usize, usize), heads: usize, score_bytes: usize, budget: usize) -> (usize, usize) {
    let per_head = n * m * score_bytes;
    let heads_per_slice = (budget / per_head.max(1)).clamp(1, heads.max(1));
    let chunks = per_head.div_ceil(budget.max(1)).clamp(1, n.div_ceil(MIN_QUERY_ROWS).max(1));
    (heads_per_slice, n.div_ceil(chunks))
}

/// Attention with score slices of at most `budget` bytes, computed in `compute` (the result
/// is cast back to the input dtype): several heads per slice when a head's `N × M` scores fit,
/// else one head and equal chunks of at least [`MIN_QUERY_ROWS`] queries. Every head is its
/// own matrix product and softmax is per query row, so how heads are grouped never changes a
/// result, and the query chunks depend on `N` and `M` only: each image's result is the same
/// whatever shares its batch.
fn sliced_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, budget: usize, compute: DType) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let dtype = q.dtype();
    let split = |x: &Tensor, len: usize| -> Result<Tensor> {
        x.reshape((b, len, heads, d))?.transpose(1, 2)?.reshape((b * heads, len, d))?.to_dtype(compute)
    };
    let scale = (d as f64).powf(-0.5);
    // In float32 the scale is applied to the scores (diffusers' order); in f16/bf16 to the
    // queries, so the unscaled products never have to fit the narrow type.
    let (q, score_scale) =
        if compute == DType::F32 { (split(q, n)?, Some(scale)) } else { ((split(q, n)? * scale)?, None) };
    let (k, v) = (split(k, m)?, split(v, m)?);
    let k_t = k.t()?;
    let heads_total = b * heads;
    let (heads_per_slice, rows) = score_slices((n, m), heads_total, compute.size_in_bytes(), budget);
    let mut outs = Vec::with_capacity(heads_total.div_ceil(heads_per_slice));
    for start in (0..heads_total).step_by(heads_per_slice) {
        let len = heads_per_slice.min(heads_total - start);
        let (q, k_t, v) = (q.narrow(0, start, len)?, k_t.narrow(0, start, len)?, v.narrow(0, start, len)?);
        let mut parts = (0..n)
            .step_by(rows)
            .map(|r0| {
                let scores = q.narrow(1, r0, rows.min(n - r0))?.matmul(&k_t)?;
                let scores = match score_scale {
                    Some(s) => elementwise::scale(&scores, s)?,
                    None => scores,
                };
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
            })
            .collect::<Result<Vec<_>>>()?;
        outs.push(if parts.len() == 1 { parts.pop().expect("one chunk") } else { Tensor::cat(&parts, 1)? });
    }
    let out = if outs.len() == 1 { outs.pop().expect("one slice") } else { Tensor::cat(&outs, 0)? };
    out.reshape((b, heads, n, d))?.transpose(1, 2)?.reshape((b, n, inner))?.to_dtype(dtype)
}

/// diffusers' `Attention` as used in transformer blocks: bias-free q/k/v, biased output.
#[derive(Debug)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    spec: AttentionSpec,
}

impl CrossAttention {
    fn new(query_dim: usize, context_dim: usize, heads: usize, spec: AttentionSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(query_dim, query_dim, false, spec.linear, vb.pp("to_q"))?,
            to_k: Linear::load(context_dim, query_dim, false, spec.linear, vb.pp("to_k"))?,
            to_v: Linear::load(context_dim, query_dim, false, spec.linear, vb.pp("to_v"))?,
            to_out: Linear::load(query_dim, query_dim, true, spec.linear, vb.pp("to_out").pp("0"))?,
            heads,
            spec,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&scaled_dot_product(&q, &k, &v, self.heads, self.spec)?)
    }
}

/// GEGLU feed-forward: `Linear(d, 8d)` split into value and gate, `value · gelu(gate)`
/// (exact erf GELU, as `F.gelu`), then `Linear(4d, d)`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, linear: LinearBackend, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(dim, inner * 2, true, linear, vb.pp("net.0.proj"))?,
            out: Linear::load(inner, dim, true, linear, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&elementwise::geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU, each pre-normed
/// (LayerNorm, eps 1e-5) and residual.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, spec: AttentionSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, spec, vb.pp("attn1"))?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, spec, vb.pp("attn2"))?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, spec.linear, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = elementwise::add(&self.attn1.forward(&self.norm1.forward(x)?, None)?, x)?;
        let x = elementwise::add(&self.attn2.forward(&self.norm2.forward(&x)?, Some(context))?, &x)?;
        elementwise::add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)
    }
}

/// The projection in and out of a spatial transformer: 1×1 conv or linear.
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` (continuous input): GroupNorm (eps 1e-6), projection in,
/// transformer blocks over the `H·W` tokens, projection out, residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of a [`SpatialTransformer`].
#[derive(Clone, Copy, Debug)]
pub struct SpatialTransformerSpec {
    /// Channels (= heads × head dim).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the text embeddings.
    pub context_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear (true) or 1×1-conv (false) projections.
    pub linear_projection: bool,
    /// The model's kernels (attention backend, convolution backend of the projections).
    pub kernels: Kernels,
    /// `upcast_attention` of the UNet config.
    pub upcast_attention: bool,
}

impl SpatialTransformer {
    /// Loads the transformer from `vb`.
    pub fn new(spec: SpatialTransformerSpec, vb: VarBuilder) -> Result<Self> {
        let c = spec.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if spec.linear_projection {
                Projection::Linear(Linear::load(c, c, true, spec.kernels.linear, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c, c, 1, 0, 1, spec.kernels.conv, vb.pp(name))?)
            })
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                let attention = AttentionSpec::new(spec.kernels, spec.upcast_attention);
                BasicTransformerBlock::new(
                    c,
                    spec.context_dim,
                    spec.heads,
                    attention,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(spec.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    /// `x` is `[B, C, H, W]`, `context` the text embeddings `[B, 77, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        elementwise::add(&out, x)
    }
}

/// The VAE mid-block self-attention: GroupNorm (eps 1e-6), one head over all channels, biased
/// projections, residual. Accepts both the current (`to_q`…) and the legacy
/// (`query`/`key`/`value`/`proj_attn`, possibly 1×1-conv shaped) tensor names.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    spec: AttentionSpec,
}

impl VaeAttention {
    /// Loads `attentions.0` from `vb`. The VAE's attention runs in the model dtype on a GPU
    /// (diffusers' default attention processor ignores its `upcast_softmax` flag).
    pub fn new(channels: usize, groups: usize, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        let linear = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            let weight = vb.get_unchecked("weight")?;
            let weight = match weight.rank() {
                4 => weight.squeeze(3)?.squeeze(2)?,
                _ => weight,
            };
            if weight.dims() != [channels, channels] {
                candle_core::bail!(
                    "{}: expected a {channels}×{channels} weight, found {:?}",
                    vb.prefix(),
                    weight.dims()
                );
            }
            Linear::with_backend(candle_nn::Linear::new(weight, Some(vb.get(channels, "bias")?)), kernels.linear)
        };
        Ok(Self {
            group_norm: GroupNorm::load(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(names[0])?,
            to_k: linear(names[1])?,
            to_v: linear(names[2])?,
            to_out: linear(names[3])?,
            spec: AttentionSpec::new(kernels, false),
        })
    }

    /// `x` is `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&scaled_dot_product(&q, &k, &v, 1, self.spec)?)?;
        elementwise::add(&out.transpose(1, 2)?.reshape((b, c, h, w))?, x)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::sliced_attention;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).expect("a") - b.to_dtype(DType::F32).expect("b")).expect("diff");
        d.abs().and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("max")
    }

    fn qkv(n: usize, m: usize, inner: usize) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        (
            Tensor::randn(0f32, 1.0, (2, n, inner), &dev).expect("q"),
            Tensor::randn(0f32, 1.0, (2, m, inner), &dev).expect("k"),
            Tensor::randn(0f32, 1.0, (2, m, inner), &dev).expect("v"),
        )
    }

    #[test]
    fn query_chunks_and_head_slices_give_the_unsliced_result() {
        // 2 images × 2 heads × 600 queries over 300 keys; head dim 8.
        let (q, k, v) = qkv(600, 300, 16);
        let whole = sliced_attention(&q, &k, &v, 2, usize::MAX, DType::F32).expect("one slice");
        // 600 × 300 × 4 B = 703 KiB per head: a 200 KiB budget forces one head per slice and
        // query chunks; 4 would be under 256 rows, so 3 chunks of 200 queries.
        let sliced = sliced_attention(&q, &k, &v, 2, 200 << 10, DType::F32).expect("sliced");
        assert!(max_abs_diff(&whole, &sliced) < 1e-6);
    }

    #[test]
    fn the_gpu_math_path_in_half_precision_stays_close_to_float32() {
        // What a GPU runs for `upcast_attention: false`: products and softmax in the model
        // dtype. Run here on the CPU for f16 and bf16 against the float32 result, with logits
        // of a few units (head dim 40, as SD 1.5's first level) and query chunks.
        let (q, k, v) = qkv(300, 77, 80);
        let (q, k) = ((q * 2.0).expect("q"), (k * 2.0).expect("k"));
        let want = sliced_attention(&q, &k, &v, 2, usize::MAX, DType::F32).expect("f32");
        for (dtype, tolerance) in [(DType::F16, 2e-2), (DType::BF16, 1.5e-1)] {
            let cast = |t: &Tensor| t.to_dtype(dtype).expect("cast");
            let got = sliced_attention(&cast(&q), &cast(&k), &cast(&v), 2, 64 << 10, dtype).expect("half");
            assert_eq!(got.dtype(), dtype);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < tolerance, "{dtype:?}: {diff}");
        }
    }
}
