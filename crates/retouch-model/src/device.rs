//! Device selection: `cpu` (the default) or `cuda[:N]` (builds with the `cuda` feature).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::ModelError;

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU, in f32.
    #[default]
    Cpu,
    /// CUDA device N, in f16.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| ModelError::Device(format!("unknown device {s:?}; expected cpu, cuda or cuda:N"))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    ///
    /// # Errors
    /// [`ModelError::Device`] when CUDA is asked of a build without the `cuda` feature, or the
    /// GPU is missing or has no kernels in this build.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

/// Parses a compute precision: `auto` (f32 on the CPU, f16 on CUDA) → `None`, or `f32`, `f16`,
/// `bf16`.
///
/// # Errors
/// [`ModelError::Device`] naming the accepted values.
pub fn parse_dtype(s: &str) -> Result<Option<DType>, ModelError> {
    match s {
        "auto" | "" => Ok(None),
        "f32" | "fp32" => Ok(Some(DType::F32)),
        "f16" | "fp16" => Ok(Some(DType::F16)),
        "bf16" => Ok(Some(DType::BF16)),
        _ => Err(ModelError::Device(format!("unknown dtype {s:?}; expected auto, f32, f16 or bf16"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device(
        "this build of retouch has no CUDA support; rebuild with `--features cuda` (see docs/gpu.md) or use --device cpu".into(),
    ))
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device, ModelError> {
    let device = Device::new_cuda(n).map_err(|e| ModelError::Device(format!("cannot open cuda:{n}: {e}")))?;
    crate::compute_cap::check(&device, n)?;
    Ok(device)
}

/// Memory in use on CUDA device `ordinal` (all processes), in bytes; `None` when it cannot be
/// read. Feeds the `retouch_gpu_memory_used_bytes` gauge.
#[cfg(feature = "cuda")]
pub fn gpu_memory_used(ordinal: usize) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, result};
    let context = CudaContext::new(ordinal).ok()?;
    context.bind_to_thread().ok()?;
    let (free, total) = result::mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_and_unknown_values_name_the_choices() {
        let device = |s: &str| s.parse::<DeviceSpec>();
        assert_eq!(device("cpu").ok(), Some(DeviceSpec::Cpu));
        assert_eq!(device("cuda").ok(), Some(DeviceSpec::Cuda(0)));
        assert_eq!(device("cuda:3").ok(), Some(DeviceSpec::Cuda(3)));
        assert!(device("gpu").is_err_and(|e| e.to_string().contains("cuda:N")));
        assert_eq!(parse_dtype("auto").ok(), Some(None));
        assert_eq!(parse_dtype("f16").ok(), Some(Some(DType::F16)));
        assert_eq!(parse_dtype("bf16").ok(), Some(Some(DType::BF16)));
        assert!(parse_dtype("int8").is_err_and(|e| e.to_string().contains("f32, f16 or bf16")));
    }
}
