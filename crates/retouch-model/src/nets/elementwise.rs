//! The networks' element-wise operations on every CPU core.
//!
//! candle runs its element-wise CPU operations — binary ops (residual adds, bias adds, the
//! GEGLU product), unary maps (GELU, scaling) — on one thread, while the matrix products around
//! them use all of them: on a 2-core machine a sixth of an edit's wall time was one idle core
//! (issue 17). Here the same operations run on rayon's pool over contiguous float32 CPU tensors.
//! Each output element is computed by the same expression as candle's op, so the results are
//! bit-identical to candle's — the tests compare — except GEGLU's GELU, which is the vectorised
//! one of [`super::activation`] (within 4·10⁻⁷·(1 + |x|) of candle's float64 erf; used for every
//! size, so results never depend on a tensor's size); since no element depends on another, all
//! are batch-invariant. Anything else (CUDA, f16/bf16, non-contiguous views, tensors too small
//! to be worth a thread) falls back to candle's op.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::activation;

/// Below this many elements one thread is faster than waking the pool.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Elements per parallel task: large enough to amortise the scheduling, small enough to
/// balance.
const TASK_ELEMENTS: usize = 1 << 14;

/// Runs `f` on the float32 data of a contiguous CPU tensor, or returns `None` (not CPU, not
/// float32, not contiguous, or too small to parallelise).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Option<Result<R>> {
    if t.elem_count() < PARALLEL_MIN_ELEMENTS {
        return None;
    }
    with_any_cpu_f32(t, f)
}

/// [`with_cpu_f32`] whatever the size: for operations whose own loop computes other bits than
/// candle's, so every size must take it (a small tensor and a batch containing it agree).
fn with_any_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Option<Result<R>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    let data = cpu.as_slice::<f32>().ok()?;
    Some(f(&data[start..end]))
}

/// `a + b` for tensors of the same shape.
///
/// # Errors
/// Shapes that differ, or a failing tensor operation.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() == b.shape()
        && let Some(result) = with_cpu_f32(a, |x| {
            with_cpu_f32(b, |y| {
                let mut out = Vec::with_capacity(x.len());
                x.par_iter().zip(y).with_min_len(TASK_ELEMENTS).map(|(p, q)| p + q).collect_into_vec(&mut out);
                Tensor::from_vec(out, a.shape(), a.device())
            })
            .unwrap_or_else(|| a + b)
        })
    {
        return result;
    }
    a + b
}

/// `x · s` (candle's `x * s`: `v · s + 0`, the affine map with a zero shift).
///
/// # Errors
/// A failing tensor operation.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    let mul = s as f32;
    with_cpu_f32(x, |data| {
        let mut out = Vec::with_capacity(data.len());
        data.par_iter().with_min_len(TASK_ELEMENTS).map(|v| *v * mul + 0.0).collect_into_vec(&mut out);
        Tensor::from_vec(out, x.shape(), x.device())
    })
    .unwrap_or_else(|| x * s)
}

/// GEGLU's gate: `h` is `[…, 2n]`, value then gate; returns `value · gelu(gate)` (`[…, n]`, the
/// exact erf GELU — on the CPU in f32 the vectorised one of [`activation`], at every size).
///
/// # Errors
/// An odd last dimension, or a failing tensor operation.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(candle_core::D::Minus1)?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("GEGLU needs an even last dimension, got {:?}", h.dims());
    }
    let half = width / 2;
    let mut out_dims = h.dims().to_vec();
    *out_dims.last_mut().expect("a last dimension") = half;
    with_any_cpu_f32(h, |data| {
        let mut out = vec![0f32; data.len() / 2];
        let rows_per_task = (TASK_ELEMENTS / width.max(1)).max(1);
        out.par_chunks_mut(half * rows_per_task).zip(data.par_chunks(width * rows_per_task)).for_each(|(dst, src)| {
            for (dst_row, src_row) in dst.chunks_mut(half).zip(src.chunks(width)) {
                let (value, gate) = src_row.split_at(half);
                activation::mul_gelu(dst_row, value, gate);
            }
        });
        Tensor::from_vec(out, out_dims.as_slice(), h.device())
    })
    .unwrap_or_else(|| {
        let value = h.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.narrow(candle_core::D::Minus1, half, half)?;
        value * gate.gelu_erf()?
    })
}

/// `x + bias` over the last dimension: `x` is `[…, n]`, `bias` `[n]` (a linear layer's bias).
///
/// # Errors
/// A bias of another length, or a failing tensor operation.
pub fn add_last_dim(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [n] {
        candle_core::bail!("a bias of shape {:?} for rows of {n}", bias.dims());
    }
    let parallel = bias.device().is_cpu() && bias.dtype() == DType::F32 && bias.is_contiguous();
    if parallel && let Some(result) = with_cpu_f32(x, |data| add_rows(data, &bias.to_vec1::<f32>()?, x)) {
        return result;
    }
    x.broadcast_add(bias)
}

/// `x + t` per channel: `x` is `[B, C, …]`, `t` `[B, C]` or `[1, C]` (a resnet's time embedding,
/// broadcast over the spatial positions).
///
/// # Errors
/// Shapes that do not fit, or a failing tensor operation.
pub fn add_per_channel(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (b, c) = (dims[0], *dims.get(1).unwrap_or(&0));
    let (tb, tc) = t.dims2()?;
    if tc != c || (tb != b && tb != 1) || dims.len() < 3 {
        candle_core::bail!("a per-channel term of shape {:?} for activations of shape {dims:?}", t.dims());
    }
    let parallel = t.device().is_cpu() && t.dtype() == DType::F32;
    if parallel
        && let Some(result) = with_cpu_f32(x, |data| {
            let plane = data.len() / (b * c).max(1);
            let terms = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; data.len()];
            let planes_per_task = (TASK_ELEMENTS / plane.max(1)).max(1);
            out.par_chunks_mut(plane * planes_per_task)
                .zip(data.par_chunks(plane * planes_per_task))
                .enumerate()
                .for_each(|(task, (dst, src))| {
                    for (i, (dst_plane, src_plane)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                        let bc = task * planes_per_task + i;
                        let term = terms[if tb == 1 { bc % c } else { bc }];
                        dst_plane.iter_mut().zip(src_plane).for_each(|(d, v)| *d = v + term);
                    }
                });
            Tensor::from_vec(out, dims, x.device())
        })
    {
        return result;
    }
    let mut t_dims = vec![tb, c];
    t_dims.resize(dims.len(), 1);
    x.broadcast_add(&t.reshape(t_dims.as_slice())?)
}

/// Nearest-neighbour resize of `x` (`[B, C, H, W]`) to `dst_h × dst_w`, with candle's index map
/// (`min(src − 1, ⌊dst_index · src / dst⌋)`, as `upsample_nearest2d`); the planes in parallel.
///
/// # Errors
/// A tensor that is not 4-D, or a failing tensor operation.
pub fn upsample_nearest2d(x: &Tensor, dst_h: usize, dst_w: usize) -> Result<Tensor> {
    let (b, c, src_h, src_w) = x.dims4()?;
    if b * c * dst_h * dst_w >= PARALLEL_MIN_ELEMENTS
        && src_h > 0
        && src_w > 0
        && let Some(result) = with_cpu_f32(x, |data| {
            let index_map = |src: usize, dst: usize| -> Vec<usize> {
                let scale = src as f64 / dst as f64;
                (0..dst).map(|i| usize::min(src - 1, (i as f64 * scale) as usize)).collect()
            };
            let (rows, cols) = (index_map(src_h, dst_h), index_map(src_w, dst_w));
            let mut out = vec![0f32; b * c * dst_h * dst_w];
            out.par_chunks_mut(dst_h * dst_w).zip(data.par_chunks(src_h * src_w)).for_each(|(dst, src)| {
                for (dst_row, &r) in dst.chunks_mut(dst_w).zip(&rows) {
                    let src_row = &src[r * src_w..(r + 1) * src_w];
                    dst_row.iter_mut().zip(&cols).for_each(|(d, &k)| *d = src_row[k]);
                }
            });
            Tensor::from_vec(out, (b, c, dst_h, dst_w), x.device())
        })
    {
        return result;
    }
    x.upsample_nearest2d(dst_h, dst_w)
}

/// `data + bias` row by row (rows of `bias.len()`), as a tensor shaped like `like`.
fn add_rows(data: &[f32], bias: &[f32], like: &Tensor) -> Result<Tensor> {
    let n = bias.len().max(1);
    let mut out = vec![0f32; data.len()];
    let rows_per_task = (TASK_ELEMENTS / n).max(1);
    out.par_chunks_mut(n * rows_per_task).zip(data.par_chunks(n * rows_per_task)).for_each(|(dst, src)| {
        for (dst_row, src_row) in dst.chunks_mut(n).zip(src.chunks(n)) {
            for ((d, v), b) in dst_row.iter_mut().zip(src_row).zip(bias) {
                *d = v + b;
            }
        }
    });
    Tensor::from_vec(out, like.shape(), like.device())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// Whether two tensors hold the same bits.
    fn identical(a: &Tensor, b: &Tensor) -> bool {
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32").iter().map(|v| v.to_bits()).collect()
        };
        a.dims() == b.dims() && bits(a) == bits(b)
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 3.0, shape, &Device::Cpu).expect("randn")
    }

    #[test]
    fn every_op_gives_candles_bits_on_large_and_small_tensors() {
        for rows in [3usize, 40_000] {
            let (a, b) = (randn(&[rows, 24]), randn(&[rows, 24]));
            assert!(identical(&add(&a, &b).expect("add"), &(&a + &b).expect("candle add")), "add, {rows} rows");
            let scaled = scale(&a, 0.125f64.sqrt()).expect("scale");
            assert!(identical(&scaled, &(&a * 0.125f64.sqrt()).expect("candle scale")), "scale, {rows} rows");
            let value = a.narrow(1, 0, 12).expect("value");
            let gate = a.narrow(1, 12, 12).expect("gate");
            let want = (value * gate.gelu_erf().expect("gelu")).expect("candle geglu");
            let got = geglu(&a).expect("geglu");
            let worst = (&got - &want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("difference");
            assert!(worst < 1e-5, "geglu, {rows} rows: {worst} from candle's");
            let first_rows = geglu(&a.narrow(0, 0, 3).expect("narrow")).expect("small geglu");
            assert!(identical(&first_rows, &got.narrow(0, 0, 3).expect("narrow")), "geglu, 3 of {rows} rows");
            let bias = randn(&[24]);
            let want = a.broadcast_add(&bias).expect("candle bias");
            assert!(identical(&add_last_dim(&a, &bias).expect("bias"), &want), "bias, {rows} rows");
        }
        for (shape, target) in [
            ([2usize, 3usize, 40usize, 48usize], (80usize, 96usize)),
            ([1, 2, 5, 7], (10, 14)),
            ([2, 8, 45, 45], (80, 100)),
        ] {
            let x = randn(&shape);
            let want = x.upsample_nearest2d(target.0, target.1).expect("candle");
            let got = upsample_nearest2d(&x, target.0, target.1).expect("ours");
            assert!(identical(&got, &want), "upsample {shape:?} to {target:?}");
        }
        for (b, tb, c, plane) in [(3usize, 3usize, 320usize, 64usize), (2, 1, 8, 4096), (1, 1, 4, 2)] {
            let x = randn(&[b, c, plane, 1]);
            let t = randn(&[tb, c]);
            let want = x.broadcast_add(&t.reshape((tb, c, 1, 1)).expect("reshape")).expect("candle");
            assert!(identical(&add_per_channel(&x, &t).expect("ours"), &want), "per channel {b}/{tb}/{c}/{plane}");
        }
    }

    #[test]
    fn other_dtypes_and_views_fall_back_to_candle() {
        let a = randn(&[300, 256]).to_dtype(DType::BF16).expect("bf16");
        let got = geglu(&a).expect("geglu");
        assert_eq!((got.dtype(), got.dims()), (DType::BF16, &[300, 128][..]));
        let view = randn(&[256, 300]).t().expect("a transposed view");
        let sum = add(&view, &view).expect("add");
        assert!(identical(&sum, &(&view + &view).expect("candle")));
        assert!(add_last_dim(&randn(&[4, 5]), &randn(&[4])).is_err(), "a bias of the wrong length");
        assert!(geglu(&randn(&[4, 5])).is_err(), "an odd GEGLU width");
    }
}
