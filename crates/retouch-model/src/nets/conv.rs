//! 2-D convolution, with a faster CPU float32 path than candle's.
//!
//! candle's CPU conv2d converts the input to NHWC, re-packs the kernel on every call and builds
//! im2col tiles of 512 output pixels with scalar loops, one small matrix product per tile: it
//! runs at about half the speed of its own matrix product. Convolutions are most of the work
//! of both the UNet and the VAE, so on the CPU in f32 this module instead
//!
//! 1. builds the im2col matrix straight from the NCHW input — for stride 1 each (channel,
//!    kernel row, kernel column) row of the matrix is the input plane shifted, i.e. a few slice
//!    copies per output row — in chunks of output rows bounded to [`CHUNK_BYTES`], channels in
//!    parallel;
//! 2. multiplies the untouched `[c_out, c_in·k·k]` weight by each chunk with one gemm call
//!    writing directly into the NCHW output (and 1×1 convolutions multiply the input itself).
//!
//! Each image of a batch is computed with the same calls whatever the batch size, so results
//! stay batch-invariant. On CUDA a convolution runs through cuDNN when the model's kernels say
//! so ([`crate::kernels::ConvBackend::Cudnn`], module [`super::cudnn`]); on the CPU oneDNN runs
//! it when installed, in f32 or (`--dtype bf16`) bf16 ([`crate::kernels::ConvBackend::OneDnn`],
//! [`crate::onednn`]; the original weights are dropped once packed); every other device and
//! dtype uses candle's implementation.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::kernels::ConvBackend;
use crate::onednn::OneDnnConv2d;

/// Upper bound of one im2col chunk, in bytes: big enough for efficient matrix products, small
/// enough not to double the memory of a 512-pixel VAE decode.
const CHUNK_BYTES: usize = 16 << 20;

/// Where a convolution's weights live and what runs it.
#[derive(Debug, Clone)]
enum Weights {
    /// candle's convolution: the weights in the model dtype, and the implementation on devices
    /// without our own.
    Candle(candle_nn::Conv2d),
    /// Weights packed for oneDNN (f32, or bf16 with `--dtype bf16`), on the CPU.
    OneDnn(std::sync::Arc<OneDnnConv2d>),
}

/// A square-kernel convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// The weights and their implementation.
    weights: Weights,
    /// Input channels.
    c_in: usize,
    /// Output channels.
    c_out: usize,
    /// Kernel size (square).
    kernel: usize,
    /// Zero padding on every side.
    padding: usize,
    /// Stride in both directions.
    stride: usize,
    /// What runs it on a GPU.
    backend: ConvBackend,
}

/// Runs `f` on the float32 data of a CPU tensor without copying it (contiguous tensors only).
pub(crate) fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("not a CPU tensor") };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    f(&data[start..end])
}

impl Conv2d {
    /// Loads `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]` from `vb`; `backend` says what
    /// runs it on a GPU.
    pub fn load(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
        backend: ConvBackend,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = candle_nn::conv2d(c_in, c_out, kernel, Conv2dConfig { padding, stride, ..Default::default() }, vb)?;
        let weights = match (backend, inner.bias()) {
            (ConvBackend::OneDnn(precision), Some(bias)) => {
                let weight = inner.weight().to_dtype(DType::F32)?.contiguous()?;
                let bias = bias.to_dtype(DType::F32)?;
                let packed = with_cpu_slice(&weight, |w| {
                    with_cpu_slice(&bias, |b| {
                        OneDnnConv2d::new(precision, w, b, (c_in, c_out, kernel), padding, stride)
                    })
                })?;
                Weights::OneDnn(std::sync::Arc::new(packed))
            }
            _ => Weights::Candle(inner),
        };
        Ok(Self { weights, c_in, c_out, kernel, padding, stride, backend })
    }

    /// The dtype this convolution takes and returns (f32 for oneDNN's products).
    pub fn dtype(&self) -> DType {
        match &self.weights {
            Weights::Candle(inner) => inner.weight().dtype(),
            Weights::OneDnn(_) => DType::F32,
        }
    }

    /// What runs this convolution on a GPU.
    pub fn backend(&self) -> ConvBackend {
        self.backend
    }

    /// `[B, c_in, H, W]` → `[B, c_out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = match &self.weights {
            Weights::OneDnn(conv) => {
                let (b, c, h, w) = x.dims4()?;
                if c != self.c_in {
                    candle_core::bail!("conv2d: expected {} input channels, got {c}", self.c_in);
                }
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let (out, oh, ow) = with_cpu_slice(&x, |input| conv.forward(input, (b, h, w)))?;
                return Tensor::from_vec(out, (b, self.c_out, oh, ow), x.device());
            }
            Weights::Candle(inner) => inner,
        };
        let weight = inner.weight();
        match inner.bias() {
            Some(bias) if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 => {
                let x = x.contiguous()?;
                with_cpu_slice(weight, |w| {
                    with_cpu_slice(bias, |b| with_cpu_slice(&x, |input| self.forward_cpu(&x, input, w, b)))
                })
            }
            #[cfg(feature = "cudnn")]
            Some(bias) if self.backend == ConvBackend::Cudnn && x.device().is_cuda() => {
                let y = super::cudnn::conv2d(&x.contiguous()?, weight, self.padding, self.stride)?;
                y.broadcast_add(&bias.reshape((1, self.c_out, 1, 1))?)
            }
            _ => inner.forward(x),
        }
    }

    fn forward_cpu(&self, x: &Tensor, input: &[f32], weight: &[f32], bias: &[f32]) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.c_in {
            candle_core::bail!("conv2d: expected {} input channels, got {c}", self.c_in);
        }
        let (k, p, s) = (self.kernel, self.padding, self.stride);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: input {h}×{w} is smaller than the {k}×{k} kernel");
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let plane = oh * ow;
        let mut out = vec![0f32; b * self.c_out * plane];
        let k_size = c * k * k;
        let rows_per_chunk = (CHUNK_BYTES / (4 * k_size * ow).max(1)).clamp(1, oh);
        let direct = k == 1 && s == 1 && p == 0;
        let mut col = if direct { Vec::new() } else { vec![0f32; k_size * rows_per_chunk * ow] };
        for (image, dst) in input.chunks_exact(c * h * w).zip(out.chunks_exact_mut(self.c_out * plane)) {
            for y0 in (0..oh).step_by(rows_per_chunk) {
                let rows = rows_per_chunk.min(oh - y0);
                let n = rows * ow;
                let rhs: &[f32] = if direct {
                    &image[y0 * ow..]
                } else {
                    im2col(image, (c, h, w), (k, p, s), (y0, rows, ow), &mut col[..k_size * n]);
                    &col[..k_size * n]
                };
                let rhs_rs = if direct { plane } else { n };
                // SAFETY: `dst` holds `c_out` rows of `plane` values, of which this writes the
                // columns `y0·ow .. y0·ow + n` of every row; `weight` is `c_out × k_size`
                // row-major; `rhs` has `k_size` rows of at least `n` values at stride `rhs_rs`.
                // All three live for the call and do not overlap.
                #[allow(unsafe_code)]
                unsafe {
                    gemm::gemm(
                        self.c_out,
                        n,
                        k_size,
                        dst.as_mut_ptr().add(y0 * ow),
                        1,
                        plane as isize,
                        false,
                        weight.as_ptr(),
                        1,
                        k_size as isize,
                        rhs.as_ptr(),
                        1,
                        rhs_rs as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
                    );
                }
            }
            dst.par_chunks_mut(plane).zip(bias.par_iter()).for_each(|(row, &b)| row.iter_mut().for_each(|v| *v += b));
        }
        Tensor::from_vec(out, (b, self.c_out, oh, ow), x.device())
    }
}

/// Fills `col` (`[c·k·k, rows·ow]`, row-major) with the im2col rows for output rows
/// `y0 .. y0 + rows` of one image `[c, h, w]`.
fn im2col(
    image: &[f32],
    (c, h, w): (usize, usize, usize),
    (k, p, s): (usize, usize, usize),
    (y0, rows, ow): (usize, usize, usize),
    col: &mut [f32],
) {
    let n = rows * ow;
    col.par_chunks_mut(k * k * n).enumerate().for_each(|(ci, block)| {
        let src = &image[ci * h * w..(ci + 1) * h * w];
        for kh in 0..k {
            for kw in 0..k {
                let row = &mut block[(kh * k + kw) * n..(kh * k + kw + 1) * n];
                for (r, out) in row.chunks_exact_mut(ow).enumerate() {
                    let iy = ((y0 + r) * s + kh) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let line = &src[iy as usize * w..(iy as usize + 1) * w];
                    if s == 1 {
                        // Output x reads input x + kw − p: one copy with zero borders.
                        let lo = p.saturating_sub(kw).min(ow);
                        let hi = (w + p).saturating_sub(kw).min(ow).max(lo);
                        out[..lo].fill(0.0);
                        out[lo..hi].copy_from_slice(&line[lo + kw - p..hi + kw - p]);
                        out[hi..].fill(0.0);
                    } else {
                        for (ox, v) in out.iter_mut().enumerate() {
                            let ix = (ox * s + kw) as isize - p as isize;
                            *v = if ix >= 0 && ix < w as isize { line[ix as usize] } else { 0.0 };
                        }
                    }
                }
            }
        }
    });
    let _ = c;
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, x)
    }
}

/// Convolution shapes of every kind the networks use, scaled down: (c_in, c_out, kernel,
/// padding, stride, h, w). Shared by the tests of each implementation.
#[cfg(test)]
pub(crate) const NETWORK_SHAPES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (8, 16, 3, 1, 1, 9, 5),   // conv_in, odd sizes
    (16, 16, 3, 1, 2, 8, 6),  // UNet downsample
    (16, 16, 3, 0, 2, 9, 9),  // VAE downsample (after its asymmetric pad)
    (32, 16, 1, 0, 1, 4, 4),  // shortcut / proj 1×1
    (4, 8, 3, 1, 1, 1, 1),    // 1×1 spatial
    (3, 32, 3, 1, 1, 40, 24), // VAE conv_in
];

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        let m = b
            .abs()
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("max");
        d / m
    }

    #[test]
    fn matches_candle_for_every_shape_the_networks_use() {
        let dev = Device::Cpu;
        for &(c_in, c_out, k, p, s, h, w) in NETWORK_SHAPES {
            let vb = candle_nn::VarBuilder::from_tensors(
                [
                    ("weight".to_string(), Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).expect("w")),
                    ("bias".to_string(), Tensor::randn(0f32, 1.0, c_out, &dev).expect("b")),
                ]
                .into(),
                DType::F32,
                &dev,
            );
            let conv = Conv2d::load(c_in, c_out, k, p, s, ConvBackend::Im2col, vb).expect("conv");
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev).expect("x");
            let ours = conv.forward(&x).expect("ours");
            let Weights::Candle(inner) = &conv.weights else { panic!("f32 weights") };
            let candle = inner.forward(&x).expect("candle");
            assert_eq!(ours.dims(), candle.dims());
            assert!(max_rel_diff(&ours, &candle) < 1e-5, "{c_in}->{c_out} k{k} p{p} s{s} {h}×{w}");
            let first = conv.forward(&x.narrow(0, 0, 1).expect("narrow")).expect("alone");
            assert_eq!(max_rel_diff(&first, &ours.narrow(0, 0, 1).expect("narrow")), 0.0, "batch invariance");
        }
    }
}
