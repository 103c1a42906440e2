//! The start-up guard for CUDA builds: candle's kernels are compiled to PTX for one compute
//! capability (`CUDA_COMPUTE_CAP` at build time, e.g. 90 for H100/H200). Below 9.0 the PTX
//! JIT-compiles forward to newer GPUs but never back to older ones; from 9.0 on the build
//! compiles arch-specific code (`sm_90a`: cudaforge suffixes every capability >= 90), which runs
//! on that exact capability only. A GPU the kernels cannot run on is refused at start-up with a
//! message saying how to rebuild, instead of failing at the first kernel.

/// The capability the kernels were built for, when the build recorded it.
pub fn compiled() -> Option<u32> {
    option_env!("RETOUCH_CUDA_COMPUTE_CAP").and_then(|s| s.trim().parse().ok())
}

/// Whether kernels built for `compiled` run on a GPU of capability `runtime` (both as
/// `major * 10 + minor`).
///
/// # Errors
/// A message naming both capabilities and the fix.
pub fn compatible(compiled: u32, runtime: u32) -> Result<(), String> {
    let arch_specific = compiled >= 90;
    if arch_specific && runtime != compiled {
        Err(format!(
            "this GPU has compute capability {}.{} but retouch was built for sm_{compiled}a, which runs \
             on compute capability {}.{} only; rebuild with CUDA_COMPUTE_CAP={runtime} (deploy/cuda/build.sh, \
             docs/gpu.md)",
            runtime / 10,
            runtime % 10,
            compiled / 10,
            compiled % 10
        ))
    } else if runtime < compiled {
        Err(format!(
            "this GPU has compute capability {}.{} but retouch was built for {}.{}; rebuild with \
             CUDA_COMPUTE_CAP={runtime} (deploy/cuda/build.sh, docs/gpu.md)",
            runtime / 10,
            runtime % 10,
            compiled / 10,
            compiled % 10
        ))
    } else {
        Ok(())
    }
}

/// Checks the opened device `n` against the build.
///
/// # Errors
/// [`crate::ModelError::Device`] when the kernels cannot run on this GPU ([`compatible`]).
#[cfg(feature = "cuda")]
pub fn check(device: &candle_core::Device, n: usize) -> Result<(), crate::ModelError> {
    let candle_core::Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let (major, minor) = cuda
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| crate::ModelError::Device(format!("cuda:{n}: cannot read the compute capability: {e}")))?;
    let runtime = (major * 10 + minor) as u32;
    match compiled() {
        Some(built) => compatible(built, runtime).map_err(|m| crate::ModelError::Device(format!("cuda:{n}: {m}"))),
        None => {
            tracing::warn!(runtime, "the build did not record CUDA_COMPUTE_CAP; cannot check kernel compatibility");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn newer_gpus_run_older_ptx_and_older_gpus_are_refused() {
        assert!(compatible(90, 90).is_ok());
        assert!(compatible(80, 90).is_ok());
        assert!(compatible(80, 86).is_ok());
        let e = compatible(90, 86).expect_err("an A10 cannot run sm_90 PTX");
        assert!(e.contains("8.6") && e.contains("9.0") && e.contains("CUDA_COMPUTE_CAP=86"), "{e}");
    }

    #[test]
    fn arch_specific_builds_run_on_their_own_capability_only() {
        assert!(compatible(90, 90).is_ok());
        let e = compatible(90, 100).expect_err("sm_90a code does not run on Blackwell");
        assert!(e.contains("sm_90a") && e.contains("10.0") && e.contains("CUDA_COMPUTE_CAP=100"), "{e}");
        assert!(compatible(100, 120).is_err());
    }
}
