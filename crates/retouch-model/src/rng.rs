//! Noise that matches `torch.Generator("cpu").manual_seed(seed)`.
//!
//! diffusers draws the initial latents and every Euler-ancestral step's noise from a CPU torch
//! generator. To reproduce a diffusers edit from its seed we re-implement that generator:
//! the 32-bit Mersenne Twister (MT19937) that torch's `CPUGeneratorImpl` wraps, and the
//! Box–Muller transform of `normal_fill` in `aten/src/ATen/native/cpu/DistributionTemplates.h`:
//!
//! * `numel >= 16`: fill every slot with a 24-bit uniform, transform each full block of 16
//!   (`u1 = 1 - d[j]`, `u2 = d[j + 8]` for `j < 8`); if `numel % 16 != 0`, draw 16 fresh
//!   uniforms and recompute the **last 16** outputs (overlapping the previous block).
//! * `numel < 16`: scalar `normal_distribution<double>` draws, which produce values in pairs
//!   and cache the second one.
//!
//! torch's AVX2 kernel uses vectorised `log`/`sincos` approximations, so values can differ from
//! this libm version by a few ulps (≤ ~5e-7); everything else (which random bits feed which
//! output) is exact.

use std::f64::consts::PI;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// A CPU random generator with torch's algorithm and state layout.
///
/// One generator per image: diffusers, given a list of generators, draws each batch item's
/// noise from its own generator, which is what makes a seed reproduce the same image whatever
/// else shares its batch.
#[derive(Clone)]
pub struct TorchGenerator {
    state: Box<[u32; N]>,
    index: usize,
    /// The cached second value of a `normal_distribution<double>` pair (the `numel < 16` path).
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator").field("index", &self.index).finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. Like torch, only the low 32 bits of the seed
    /// initialise the twister, so `seed` and `seed + 2^32` give the same noise.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: N, next_double_normal: None }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % N] & LOWER_MASK);
            let mut v = s[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            s[i] = v;
        }
        self.index = 0;
    }

    /// The next raw 32-bit output (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `generator->random64()`: two draws, the first one in the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`, with torch's pair caching.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, generator=g, dtype=torch.float32)`, flattened.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !numel.is_multiple_of(16) {
            let tail = &mut data[numel - 16..];
            for slot in tail.iter_mut() {
                *slot = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// `normal_fill_16`: turns 16 uniforms into 16 standard normals in place.
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // torch computes 2π in double and rounds the product to float.
        let theta = (2.0 * PI * f64::from(u2)) as f32;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn mt19937_reference_output() {
        // The canonical MT19937 check: the 10000th output for seed 5489 is 4123659995.
        let mut g = TorchGenerator::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn matches_torch_check_values() {
        // Values printed by torch 2.15 on CPU (shared/reference/instructpix2pix.md §4.3).
        let mut g = TorchGenerator::new(0);
        let first = g.randn(4 * 64 * 64);
        close(
            &first[..8],
            &[-1.1258398, -1.1523602, -0.2505786, -0.4338788, 0.8487104, 0.6920092, -0.3160128, -2.1152194],
            1e-6,
        );
        let sum: f64 = first.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - -124.112700).abs() < 1e-3, "sum {sum}");
        let second = g.randn(4 * 64 * 64);
        close(&second[..4], &[-0.5518361, 1.5398073, 1.0035588, -0.7947894], 1e-6);

        let mut g = TorchGenerator::new(0);
        close(&g.randn(4), &[1.5410, -0.2934, -2.1788, 0.5684], 1e-4);
    }

    #[test]
    fn seeds_use_low_32_bits() {
        assert_eq!(TorchGenerator::new(7).randn(64), TorchGenerator::new((1 << 32) + 7).randn(64));
    }
}
