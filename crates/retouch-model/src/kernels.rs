//! Which implementation runs the two heaviest operations — convolutions and attention — chosen
//! once, when a model loads.
//!
//! On the CPU the products run on oneDNN ([`crate::onednn`]) when `libdnnl.so.2` is installed —
//! f32 by default, bf16 with `--dtype bf16` (which needs it) — else on the crate's own float32
//! convolution and attention (`--conv im2col` asks for those). On a GPU the fast paths are
//! compile-time features and run-time choices:
//!
//! | lever | `auto` picks it when | otherwise |
//! |---|---|---|
//! | `--conv onednn`: oneDNN's f32 convolutions, linear layers, attention | on the CPU in f32, `libdnnl.so.2` installed | `im2col`: the crate's own |
//! | `--conv cudnn`: cuDNN (feature `cudnn`) | built with `cudnn`, on CUDA | `im2col`: candle's im2col + cuBLAS |
//! | `--attention flash`: FlashAttention-2 (feature `flash-attn`) | built with `flash-attn`, on CUDA, f16/bf16 | `math`: matmul, softmax, matmul |
//!
//! Asking for a lever this build or device cannot run is an error at load time, never a
//! silent fallback: a benchmark that says "cudnn" ran cuDNN. `auto` is what users get; the
//! explicit values exist so one binary can measure each lever (deploy/cuda/device-check.sh).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::ModelError;
use crate::onednn::Precision;

/// The convolution implementation asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvChoice {
    /// cuDNN when available, else im2col.
    #[default]
    Auto,
    /// cuDNN (CUDA builds with the `cudnn` feature).
    Cudnn,
    /// im2col + matrix products (candle's on CUDA, the crate's own on the CPU).
    Im2col,
    /// oneDNN's f32 convolutions and linear layers (CPU, f32; bf16 on the CPU always runs
    /// oneDNN).
    OneDnn,
}

/// The attention implementation asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionChoice {
    /// Flash attention when available, else the matmul path.
    #[default]
    Auto,
    /// FlashAttention-2 (CUDA builds with the `flash-attn` feature, f16/bf16).
    Flash,
    /// Matmul, softmax, matmul, in bounded slices.
    Math,
}

/// The levers asked for (`LoadOptions::kernels`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelChoice {
    /// Convolutions.
    pub conv: ConvChoice,
    /// Attention.
    pub attention: AttentionChoice,
}

/// A convolution implementation in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvBackend {
    /// im2col + matrix products.
    Im2col,
    /// cuDNN.
    Cudnn,
    /// oneDNN (`--dtype bf16` or `--conv onednn` on the CPU, [`crate::onednn`]).
    OneDnn(Precision),
}

/// A linear-layer implementation in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearBackend {
    /// candle's matrix product in the model dtype (gemm on the CPU, cuBLAS on a GPU).
    Native,
    /// oneDNN (`--dtype bf16` or `--conv onednn` on the CPU, [`crate::onednn`]).
    OneDnn(Precision),
}

/// An attention implementation in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionBackend {
    /// Matmul, softmax, matmul.
    Math,
    /// FlashAttention-2 (layers whose head size it cannot take use the matmul path).
    Flash,
    /// oneDNN's products and softmax on the CPU ([`crate::onednn::attention`]).
    OneDnn(Precision),
}

/// The levers a loaded model runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// Convolutions.
    pub conv: ConvBackend,
    /// Attention.
    pub attention: AttentionBackend,
    /// Linear layers of the attention blocks.
    pub linear: LinearBackend,
}

impl Kernels {
    /// The CPU's (and tests') levers in f32.
    pub const CPU: Self =
        Self { conv: ConvBackend::Im2col, attention: AttentionBackend::Math, linear: LinearBackend::Native };
    /// The CPU's levers in bf16: oneDNN for convolutions and linear layers.
    pub const CPU_BF16: Self = Self {
        conv: ConvBackend::OneDnn(Precision::Bf16),
        attention: AttentionBackend::OneDnn(Precision::Bf16),
        linear: LinearBackend::OneDnn(Precision::Bf16),
    };
    /// The CPU's levers in f32 with `--conv onednn`: oneDNN's f32 products.
    pub const CPU_ONEDNN_F32: Self = Self {
        conv: ConvBackend::OneDnn(Precision::F32),
        attention: AttentionBackend::OneDnn(Precision::F32),
        linear: LinearBackend::OneDnn(Precision::F32),
    };

    /// Whether matrix products run in bf16 on the CPU while tensors stay f32.
    pub fn cpu_bf16(&self) -> bool {
        self.linear == LinearBackend::OneDnn(Precision::Bf16)
    }

    /// What runs the linear layers of the networks that stay in the model's float dtype
    /// whatever `--dtype bf16` says (the CLIP text encoder and the safety checker's vision
    /// tower): oneDNN's f32 products where the UNet's run on oneDNN, else candle's.
    pub fn clip_linear(&self) -> LinearBackend {
        match self.linear {
            LinearBackend::OneDnn(_) => LinearBackend::OneDnn(Precision::F32),
            LinearBackend::Native => LinearBackend::Native,
        }
    }
}

/// Whether this binary was built with cuDNN convolutions.
pub const HAS_CUDNN: bool = cfg!(feature = "cudnn");

/// The FlashAttention-2 head sizes attention layers use (candle-flash-attn rounds a head size up
/// to the next of 32, 64, 96, 128, 160, 192, 224, 256, 512 and runs that kernel). SD 1.x's UNet
/// has heads of 40, 80 and 160 (kernels 64, 96, 160), its VAE one head of 512; SD 2.x's heads of
/// 64 land on 64 too. `deploy/cuda/build.sh` compiles only these kernels (fp16 and bf16, not
/// causal) out of the 53 candle-flash-attn ships — a sixth of the build time and binary size —
/// and reads this line to know which: keep it one line. A layer whose kernel is not listed
/// runs the matmul path.
pub const FLASH_KERNEL_HEAD_SIZES: [usize; 4] = [64, 96, 160, 512];

/// The FlashAttention-2 kernel (head size) candle-flash-attn runs for heads of `head_dim`,
/// if we build it: head sizes must be multiples of 8 and at most 512.
pub fn flash_kernel_for(head_dim: usize) -> Option<usize> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > 512 {
        return None;
    }
    let kernel = [32, 64, 96, 128, 160, 192, 224, 256, 512].into_iter().find(|&k| head_dim <= k)?;
    FLASH_KERNEL_HEAD_SIZES.contains(&kernel).then_some(kernel)
}
/// Whether this binary was built with flash attention.
pub const HAS_FLASH_ATTN: bool = cfg!(feature = "flash-attn");

impl KernelChoice {
    /// The levers for a model on `device` computing in `dtype`.
    ///
    /// # Errors
    /// [`ModelError::Device`] when an explicit choice cannot run here, saying why.
    pub fn resolve(self, device: &Device, dtype: DType) -> Result<Kernels, ModelError> {
        let cuda = device.is_cuda();
        if device.is_cpu() && dtype == DType::BF16 {
            // candle's CPU kernels have no bf16 matrix product (its convolutions fail, its
            // matmul widens to f32): bf16 on the CPU is oneDNN's, for convolutions and linear
            // layers, or nothing.
            crate::onednn::ensure_available()?;
            if !matches!(self.conv, ConvChoice::Auto | ConvChoice::OneDnn) || self.attention == AttentionChoice::Flash {
                return Err(ModelError::Device(
                    "bf16 on the CPU runs oneDNN's convolutions and the f32 attention; leave --conv and \
                     --attention at auto (or math)"
                        .into(),
                ));
            }
            return Ok(Kernels::CPU_BF16);
        }
        let conv = match self.conv {
            ConvChoice::Im2col => ConvBackend::Im2col,
            ConvChoice::Auto if HAS_CUDNN && cuda => ConvBackend::Cudnn,
            ConvChoice::Auto
                if device.is_cpu()
                    && dtype == DType::F32
                    && self.attention != AttentionChoice::Flash
                    && crate::onednn::ensure_library().is_ok() =>
            {
                // oneDNN's f32 products are faster than the crate's own and as exact (f32
                // throughout, within 1/255 of diffusers); without the library, im2col.
                return Ok(Kernels::CPU_ONEDNN_F32);
            }
            ConvChoice::Auto => ConvBackend::Im2col,
            ConvChoice::Cudnn if !HAS_CUDNN => {
                return Err(ModelError::Device(
                    "this build of retouch has no cuDNN convolutions; rebuild with `--features cudnn` \
                     (docs/gpu.md) or use --conv im2col"
                        .into(),
                ));
            }
            ConvChoice::Cudnn if !cuda => {
                return Err(ModelError::Device("--conv cudnn needs a CUDA device (--device cuda)".into()));
            }
            ConvChoice::Cudnn => ConvBackend::Cudnn,
            ConvChoice::OneDnn if !device.is_cpu() || dtype != DType::F32 => {
                return Err(ModelError::Device(
                    "--conv onednn runs on the CPU in f32 (bf16 on the CPU uses oneDNN anyway)".into(),
                ));
            }
            ConvChoice::OneDnn => {
                crate::onednn::ensure_library()?;
                return Ok(Kernels::CPU_ONEDNN_F32);
            }
        };
        let linear = LinearBackend::Native;
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let attention = match self.attention {
            AttentionChoice::Math => AttentionBackend::Math,
            AttentionChoice::Auto if HAS_FLASH_ATTN && cuda && half => AttentionBackend::Flash,
            AttentionChoice::Auto => AttentionBackend::Math,
            AttentionChoice::Flash if !HAS_FLASH_ATTN => {
                return Err(ModelError::Device(
                    "this build of retouch has no flash attention; rebuild with `--features flash-attn` \
                     (docs/gpu.md) or use --attention math"
                        .into(),
                ));
            }
            AttentionChoice::Flash if !cuda => {
                return Err(ModelError::Device("--attention flash needs a CUDA device (--device cuda)".into()));
            }
            AttentionChoice::Flash if !half => {
                return Err(ModelError::Device(format!(
                    "flash attention computes in f16 or bf16, not {dtype:?}; use --dtype f16 or --attention math"
                )));
            }
            AttentionChoice::Flash => AttentionBackend::Flash,
        };
        Ok(Kernels { conv, attention, linear })
    }
}

impl FromStr for ConvChoice {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cudnn" => Ok(Self::Cudnn),
            "im2col" => Ok(Self::Im2col),
            "onednn" => Ok(Self::OneDnn),
            _ => Err(ModelError::Device(format!("unknown convolution {s:?}; expected auto, cudnn, im2col or onednn"))),
        }
    }
}

impl FromStr for AttentionChoice {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "flash" => Ok(Self::Flash),
            "math" => Ok(Self::Math),
            _ => Err(ModelError::Device(format!("unknown attention {s:?}; expected auto, flash or math"))),
        }
    }
}

impl fmt::Display for ConvBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Im2col => "im2col",
            Self::Cudnn => "cudnn",
            Self::OneDnn(precision) => precision.backend_name(),
        })
    }
}

impl fmt::Display for AttentionBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Math => "math",
            Self::Flash => "flash",
            Self::OneDnn(precision) => precision.backend_name(),
        })
    }
}

impl fmt::Display for LinearBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::OneDnn(precision) => precision.backend_name(),
        })
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conv={} attention={}", self.conv, self.attention)?;
        match self.linear {
            LinearBackend::Native => Ok(()),
            linear => write!(f, " linear={linear}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_resolves_auto_to_its_own_paths_and_refuses_gpu_levers_by_name() {
        let cpu = Device::Cpu;
        let f32_auto = if crate::onednn::ensure_library().is_ok() { Kernels::CPU_ONEDNN_F32 } else { Kernels::CPU };
        assert_eq!(KernelChoice::default().resolve(&cpu, DType::F32).ok(), Some(f32_auto));
        assert_eq!(KernelChoice::default().resolve(&cpu, DType::F16).ok(), Some(Kernels::CPU));
        let cudnn = KernelChoice { conv: ConvChoice::Cudnn, ..Default::default() };
        let err = cudnn.resolve(&cpu, DType::F32).expect_err("cudnn on the CPU").to_string();
        assert!(err.contains(if HAS_CUDNN { "needs a CUDA device" } else { "--features cudnn" }), "{err}");
        let flash = KernelChoice { attention: AttentionChoice::Flash, ..Default::default() };
        let err = flash.resolve(&cpu, DType::F16).expect_err("flash on the CPU").to_string();
        assert!(err.contains(if HAS_FLASH_ATTN { "needs a CUDA device" } else { "--features flash-attn" }), "{err}");
        let explicit = KernelChoice { conv: ConvChoice::Im2col, attention: AttentionChoice::Math };
        assert_eq!(explicit.resolve(&cpu, DType::F16).ok(), Some(Kernels::CPU));
        // bf16 on the CPU: oneDNN where the library and the CPU allow, else a clear error.
        match crate::onednn::ensure_available() {
            Ok(_) => {
                assert_eq!(KernelChoice::default().resolve(&cpu, DType::BF16).ok(), Some(Kernels::CPU_BF16));
                assert_eq!(Kernels::CPU_BF16.to_string(), "conv=onednn-bf16 attention=onednn-bf16 linear=onednn-bf16");
                let err = explicit.resolve(&cpu, DType::BF16).expect_err("im2col in bf16").to_string();
                assert!(err.contains("leave --conv"), "{err}");
            }
            Err(why) => {
                let err = explicit.resolve(&cpu, DType::BF16).expect_err("bf16 on the CPU").to_string();
                assert!(err.contains("--dtype f32") && err == why.to_string(), "{err}");
            }
        }
    }

    #[test]
    fn choices_parse_and_unknown_values_name_the_alternatives() {
        assert_eq!("cudnn".parse::<ConvChoice>().ok(), Some(ConvChoice::Cudnn));
        assert_eq!("im2col".parse::<ConvChoice>().ok(), Some(ConvChoice::Im2col));
        assert_eq!("flash".parse::<AttentionChoice>().ok(), Some(AttentionChoice::Flash));
        assert_eq!("math".parse::<AttentionChoice>().ok(), Some(AttentionChoice::Math));
        assert!("winograd".parse::<ConvChoice>().is_err_and(|e| e.to_string().contains("cudnn, im2col or onednn")));
        assert!("sdpa".parse::<AttentionChoice>().is_err_and(|e| e.to_string().contains("flash or math")));
        assert_eq!(Kernels::CPU.to_string(), "conv=im2col attention=math");
    }

    #[test]
    fn flash_runs_the_head_sizes_of_sd_models_and_no_kernel_left_out_of_the_build() {
        // SD 1.x UNet heads (320/8, 640/8, 1280/8), SD 2.x heads, the SD VAE's single head.
        assert_eq!([40, 80, 160, 64, 512].map(flash_kernel_for), [Some(64), Some(96), Some(160), Some(64), Some(512)]);
        // Not multiples of 8, too large, or rounding to a kernel deploy/cuda/build.sh leaves out.
        assert_eq!([4, 20, 513, 0, 24, 128, 200].map(flash_kernel_for), [None; 7]);
        // build.sh reads FLASH_KERNEL_HEAD_SIZES from this file's source: keep that line parseable.
        let source = include_str!("kernels.rs");
        let line = source.lines().find(|l| l.starts_with("pub const FLASH_KERNEL_HEAD_SIZES")).expect("the line");
        let listed: Vec<usize> = line
            .split('[')
            .nth(2)
            .and_then(|rest| rest.split(']').next())
            .map(|list| list.split(',').filter_map(|v| v.trim().parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(listed, FLASH_KERNEL_HEAD_SIZES);
    }
}
