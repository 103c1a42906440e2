//! A linear layer whose rows do not depend on how many sequences share the call.
//!
//! gemm (candle's CPU matmul) picks its kernel from the matrix shape: a matrix-vector kernel
//! for one row, dot-product ("horizontal") kernels when rows × outputs ≤ 256, a different
//! K-blocking below 64 × 64. Those kernels sum in other orders, so a sequence's result would
//! change with the number of sequences batched with it — the last bits of an edit would depend
//! on its batch. When one sequence alone would take such a small-matrix path, each sequence is
//! multiplied on its own, so every batch size takes the same path per sequence; above that
//! every batch size takes the general kernel, whose summation order does not depend on the row
//! count. Only tiny shapes (1-token attention at the lowest UNet level of small images, test
//! models) take the per-sequence branch.
//!
//! Where the model's kernels say so (the CPU with oneDNN installed: f32, or bf16 with `--dtype
//! bf16`) the product is oneDNN's ([`crate::onednn::OneDnnLinear`]: weights packed at load, the
//! originals dropped, one call per sequence).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::with_cpu_slice;
use crate::kernels::LinearBackend;
use crate::onednn::OneDnnLinear;

/// `y = x Wᵀ + b` over `[B, T, in]`, batch-invariant.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The product `x Wᵀ` (candle-nn's layer without its bias), or oneDNN's (bias
    /// included).
    inner: Product,
    /// `b`, added on every core ([`super::elementwise::add_last_dim`]; candle-nn adds it on one).
    bias: Option<Tensor>,
    /// Rows of `W`.
    out_features: usize,
}

/// What computes `x Wᵀ`.
#[derive(Debug, Clone)]
enum Product {
    /// candle-nn's layer without its bias.
    Candle(candle_nn::Linear),
    /// oneDNN (f32 or bf16), bias fused.
    OneDnn(Arc<OneDnnLinear>),
}

/// Whether gemm would use a shape-specific kernel for `rows × out_features`.
fn small_matrix(rows: usize, out_features: usize) -> bool {
    rows <= 1 || rows * out_features <= 256 || (rows <= 64 && out_features <= 64)
}

impl Linear {
    /// Wraps a loaded layer.
    pub fn new(inner: candle_nn::Linear) -> Self {
        let out_features = inner.weight().dim(0).unwrap_or(0);
        let bias = inner.bias().cloned();
        Self { inner: Product::Candle(candle_nn::Linear::new(inner.weight().clone(), None)), bias, out_features }
    }

    /// Wraps a loaded layer, run by `backend`.
    ///
    /// # Errors
    /// When oneDNN cannot pack the weights.
    pub fn with_backend(inner: candle_nn::Linear, backend: LinearBackend) -> Result<Self> {
        match backend {
            LinearBackend::Native => Ok(Self::new(inner)),
            LinearBackend::OneDnn(precision) => {
                let (out_features, in_features) = inner.weight().dims2()?;
                let weight = inner.weight().to_dtype(DType::F32)?.contiguous()?;
                let bias = inner.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
                let packed = with_cpu_slice(&weight, |w| match &bias {
                    Some(bias) => {
                        with_cpu_slice(bias, |b| OneDnnLinear::new(precision, w, out_features, in_features, Some(b)))
                    }
                    None => OneDnnLinear::new(precision, w, out_features, in_features, None),
                })?;
                Ok(Self { inner: Product::OneDnn(Arc::new(packed)), bias: None, out_features })
            }
        }
    }

    /// `weight` `[out, in]` and `bias` `[out]` from `vb`, run by `backend`.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, backend: LinearBackend, vb: VarBuilder) -> Result<Self> {
        let inner = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        Self::with_backend(inner, backend)
    }

    /// Applies the layer to `[B, T, in]` (or any shape the inner layer accepts).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = match &self.inner {
            Product::OneDnn(product) => {
                let dims = x.dims().to_vec();
                let sequences = if dims.len() >= 3 { dims[0] } else { 1 };
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let out = with_cpu_slice(&x, |input| product.forward(input, sequences))?;
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = self.out_features;
                }
                return Tensor::from_vec(out, out_dims, x.device());
            }
            Product::Candle(inner) => inner,
        };
        let product = match *x.dims() {
            [b, t, _] if b > 1 && small_matrix(t, self.out_features) => {
                let parts = (0..b).map(|i| inner.forward(&x.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            _ => inner.forward(x)?,
        };
        match &self.bias {
            Some(bias) => super::elementwise::add_last_dim(&product, bias),
            None => Ok(product),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar())
            .expect("diff")
    }

    #[test]
    fn a_sequence_gives_the_same_bits_alone_and_in_a_batch() {
        let dev = Device::Cpu;
        for (tokens, k, n) in
            [(1usize, 32usize, 32usize), (1, 64, 320), (4, 16, 16), (64, 32, 32), (16, 64, 128), (77, 32, 64)]
        {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("w");
            let b = Tensor::randn(0f32, 1.0, n, &dev).expect("b");
            let layer = Linear::new(candle_nn::Linear::new(w, Some(b)));
            let x = Tensor::randn(0f32, 1.0, (9, tokens, k), &dev).expect("x");
            let alone = layer.forward(&x.narrow(0, 0, 1).expect("narrow")).expect("alone");
            for batch in [3, 9] {
                let together = layer.forward(&x.narrow(0, 0, batch).expect("narrow")).expect("batched");
                let first = together.narrow(0, 0, 1).expect("first");
                assert_eq!(max_diff(&alone, &first), 0.0, "tokens {tokens} in {k} out {n} batch {batch}");
            }
        }
    }
}
