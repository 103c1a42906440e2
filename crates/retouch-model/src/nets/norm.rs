//! GroupNorm, with the SiLU that follows it in every resnet fused in, in as few passes over
//! memory as each device allows.
//!
//! candle-nn's `GroupNorm` is about a dozen separate tensor operations (casts, two reductions,
//! broadcast subtract / divide / multiply / add, square, square root), each a full pass over the
//! activations and, on the CPU, single-threaded; the SiLU after it is one more. Here:
//!
//! * **CPU, float32**: one fused loop per (image, group), groups in parallel: a first pass
//!   accumulates the sum and the sum of squares in float64 (eight independent lanes, so the
//!   compiler vectorises it; the order is fixed, so the result is deterministic), a second pass
//!   writes `(x − mean) / sqrt(var + eps) · γ[c] + β[c]`, and the SiLU, into the output
//!   (vectorised: [`super::activation`]). Two passes instead of about fourteen, both parallel.
//!   Each (image, group) is computed the same way whatever else is in the batch, so results
//!   stay batch-invariant to the bit.
//! * **everywhere else** (CUDA, or f16/bf16): candle's fused layer-norm kernel (one kernel, tested
//!   by candle, float32 accumulation) over the tensor reshaped to `[B, groups, C/groups·H·W]` with a
//!   unit scale and zero shift, then the per-channel affine and the SiLU: four kernels instead of
//!   about fourteen. No hand-written GPU kernel.

use std::sync::Mutex;

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::activation::{self, simd_loop};

/// diffusers' `nn.GroupNorm(groups, channels, eps, affine=True)`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Per-channel scale γ, `[C]`.
    weight: Tensor,
    /// Per-channel shift β, `[C]`.
    bias: Tensor,
    /// Number of groups; divides `channels`.
    groups: usize,
    /// Channels of the input.
    channels: usize,
    /// Added to the variance.
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) from `vb`.
    ///
    /// # Errors
    /// Missing or misshapen tensors, or `groups` not dividing `channels`.
    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups, channels, eps })
    }

    /// Normalises `x` (`[B, C, …]`).
    ///
    /// # Errors
    /// A channel count other than the norm's, or a failing tensor operation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `silu(group_norm(x))`, as every resnet and output head computes it.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!("GroupNorm over {} channels got a tensor of shape {dims:?}", self.channels);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            self.cpu_f32(x, silu)
        } else {
            self.composite(x, silu)
        }
    }

    /// The CPU float32 path: two fused, parallel passes (module docs).
    fn cpu_f32(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let plane: usize = dims[2..].iter().product();
        let per_group = self.channels / self.groups;
        let group_len = per_group * plane;
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("not a CPU tensor") };
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
        let input = &cpu.as_slice::<f32>()?[start..end];
        // Zeroed by calloc (fresh pages for large tensors), written once below.
        let mut out = vec![0f32; input.len()];
        let (eps, groups, plane) = (self.eps, self.groups, plane.max(1));
        out.par_chunks_mut(group_len.max(1)).zip(input.par_chunks(group_len.max(1))).enumerate().for_each(
            |(index, (dst, src))| {
                let (mean, inv_std) = moments(src, eps);
                let first_channel = (index % groups) * per_group;
                for (c, (dst_row, src_row)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                    let scale = inv_std * gamma[first_channel + c];
                    let shift = beta[first_channel + c] - mean * scale;
                    if silu {
                        activation::affine_silu(dst_row, src_row, scale, shift);
                    } else {
                        activation::affine(dst_row, src_row, scale, shift);
                    }
                }
            },
        );
        Tensor::from_vec(out, dims, x.device())
    }

    /// The device-agnostic path: candle's layer-norm kernel over each group, then the affine.
    fn composite(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let b = dims[0];
        let group_len = x.elem_count() / (b * self.groups).max(1);
        let grouped = x.contiguous()?.reshape((b, self.groups, group_len))?;
        let (ones, zeros) = identity_affine(group_len, x.dtype(), x.device())?;
        let normed = candle_nn::ops::layer_norm(&grouped, &ones, &zeros, self.eps as f32)?;
        let mut affine_dims = vec![1; dims.len()];
        affine_dims[1] = self.channels;
        let weight = self.weight.to_dtype(x.dtype())?.reshape(affine_dims.as_slice())?;
        let bias = self.bias.to_dtype(x.dtype())?.reshape(affine_dims.as_slice())?;
        let y = normed.reshape(dims.as_slice())?.broadcast_mul(&weight)?.broadcast_add(&bias)?;
        if silu { y.silu() } else { Ok(y) }
    }
}

simd_loop! {
    /// Mean and `1 / sqrt(var + eps)` of one group, accumulated in float64 over eight fixed
    /// lanes (the same order, so the same bits, in both compiled copies).
    fn moments(values: &[f32], eps: f64) -> (f32, f32) {
        const LANES: usize = 8;
        let mut sum = [0f64; LANES];
        let mut sum_sq = [0f64; LANES];
        let mut chunks = values.chunks_exact(LANES);
        for chunk in &mut chunks {
            for lane in 0..LANES {
                let v = f64::from(chunk[lane]);
                sum[lane] += v;
                sum_sq[lane] += v * v;
            }
        }
        let (mut s, mut s2) = (sum.iter().sum::<f64>(), sum_sq.iter().sum::<f64>());
        for &v in chunks.remainder() {
            s += f64::from(v);
            s2 += f64::from(v) * f64::from(v);
        }
        let n = values.len().max(1) as f64;
        let mean = s / n;
        let var = (s2 / n - mean * mean).max(0.0);
        (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
    }
}

/// A unit scale and a zero shift of at least `len` values for `layer_norm`, shared by every
/// norm of the process: one pair of buffers per (device, dtype), grown to the longest row seen
/// and narrowed per call (a narrowed prefix is contiguous, as the kernel requires). Sharing them
/// keeps a GPU from holding a copy per norm, and from filling fresh ones on every call.
fn identity_affine(len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    /// The buffers: (device, dtype, ones, zeros).
    static CACHE: Mutex<Vec<(Device, DType, Tensor, Tensor)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let slot =
        cache.iter().position(|(d, t, ones, _)| d.same_device(device) && *t == dtype && ones.dim(0).ok() >= Some(len));
    let (ones, zeros) = match slot {
        Some(i) => (cache[i].2.clone(), cache[i].3.clone()),
        None => {
            let ones = Tensor::ones(len, dtype, device)?;
            let zeros = Tensor::zeros(len, dtype, device)?;
            cache.retain(|(d, t, _, _)| !(d.same_device(device) && *t == dtype));
            cache.push((device.clone(), dtype, ones.clone(), zeros.clone()));
            (ones, zeros)
        }
    };
    Ok((ones.narrow(D::Minus1, 0, len)?, zeros.narrow(D::Minus1, 0, len)?))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::VarBuilder;

    use super::GroupNorm;

    fn norm(groups: usize, channels: usize, dtype: DType) -> (GroupNorm, candle_nn::GroupNorm) {
        let dev = Device::Cpu;
        let weight = Tensor::randn(1f32, 0.5, channels, &dev).and_then(|t| t.to_dtype(dtype)).expect("weight");
        let bias = Tensor::randn(0f32, 0.5, channels, &dev).and_then(|t| t.to_dtype(dtype)).expect("bias");
        let vb = VarBuilder::from_tensors(
            [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())].into(),
            dtype,
            &dev,
        );
        let ours = GroupNorm::load(groups, channels, 1e-5, vb).expect("load");
        let reference = candle_nn::GroupNorm::new(weight, bias, channels, groups, 1e-5).expect("reference");
        (ours, reference)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).expect("a") - b.to_dtype(DType::F32).expect("b")).expect("diff");
        d.abs().and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("max")
    }

    /// Activations with a large common offset, where a single-pass float32 variance would
    /// cancel catastrophically.
    fn activations(shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
        let x = (Tensor::randn(0f32, 2.0, shape, &Device::Cpu).expect("x") + 30.0).expect("offset");
        x.to_dtype(dtype).expect("dtype")
    }

    #[test]
    fn the_fused_cpu_path_matches_candle_group_norm_and_silu() {
        for (groups, channels, h, w) in [(4, 8, 5, 3), (32, 64, 8, 8), (2, 6, 1, 1), (3, 9, 7, 11)] {
            let (ours, reference) = norm(groups, channels, DType::F32);
            let x = activations((2, channels, h, w), DType::F32);
            let want = reference.forward(&x).expect("reference");
            assert!(max_abs_diff(&ours.forward(&x).expect("ours"), &want) < 2e-4, "{groups}/{channels} {h}×{w}");
            let want_silu = want.silu().expect("silu");
            assert!(max_abs_diff(&ours.forward_silu(&x).expect("silu"), &want_silu) < 2e-4);
        }
    }

    #[test]
    fn the_fused_cpu_path_is_batch_invariant_to_the_bit() {
        let (ours, _) = norm(8, 32, DType::F32);
        let x = activations((3, 32, 6, 10), DType::F32);
        let batched = ours.forward_silu(&x).expect("batched");
        for i in 0..3 {
            let alone = ours.forward_silu(&x.narrow(0, i, 1).expect("narrow")).expect("alone");
            let row = batched.narrow(0, i, 1).expect("row");
            assert_eq!(max_abs_diff(&alone, &row), 0.0, "image {i}");
        }
    }

    #[test]
    fn the_composite_path_used_on_gpus_matches_in_every_dtype() {
        // The layer-norm composite is what CUDA (and f16/bf16 anywhere) runs; run it on the CPU
        // in each dtype against candle's GroupNorm computed in float32 with the same parameters.
        // candle's layer norm takes the variance in one pass (E[x²] − mean²), so with these
        // offset activations even float32 is only good to ~1e-3.
        let (ours_f32, reference) = norm(4, 16, DType::F32);
        let x = activations((2, 16, 6, 5), DType::F32);
        let want = reference.forward(&x).and_then(|t| t.silu()).expect("want");
        for (dtype, tolerance) in [(DType::F32, 1e-3), (DType::F16, 3e-2), (DType::BF16, 2e-1)] {
            let ours = GroupNorm {
                weight: ours_f32.weight.to_dtype(dtype).expect("weight"),
                bias: ours_f32.bias.to_dtype(dtype).expect("bias"),
                ..ours_f32.clone()
            };
            let got = ours.composite(&x.to_dtype(dtype).expect("x"), true).expect("composite");
            assert_eq!(got.dtype(), dtype);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < tolerance, "{dtype:?}: {diff}");
        }
    }
}
