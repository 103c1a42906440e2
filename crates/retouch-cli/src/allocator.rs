//! Tunes glibc's allocator for tensor work, before anything allocates much.
//!
//! Every candle op allocates its output afresh. With glibc's defaults, blocks above a dynamic
//! threshold are mmap'd and every free returns memory to the kernel, so each op faults in and
//! zeroes fresh pages: `perf` showed ~12 % of a `retouch bench` run in page faults. A
//! fixed mmap threshold at glibc's maximum (32 MiB) and a high trim threshold keep freed blocks
//! in the heap for the next op; docs/benchmarks.md has the measured effect.
//! The heap then stays near its peak between batches, which a worker reaches on its first
//! batch anyway. Skipped when `GLIBC_TUNABLES` already sets a `glibc.malloc` tunable (the
//! operator's choice wins) and on non-glibc targets.

/// The largest mmap threshold glibc accepts on 64-bit (`HEAP_MAX_SIZE / 2`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory kept at the top of a heap before glibc trims it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Applies the settings; returns whether they were applied.
pub fn tune_for_tensors() -> bool {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called at start-up, before the
    // process has spawned threads.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
