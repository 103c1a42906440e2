//! Records the CUDA compute capability the kernels are built for, so the binary can refuse a
//! GPU it has no kernels for (see `src/compute_cap.rs`).

fn main() {
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        println!("cargo::rustc-env=RETOUCH_CUDA_COMPUTE_CAP={cap}");
    }
}
