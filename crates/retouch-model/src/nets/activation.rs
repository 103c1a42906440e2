//! SiLU and the exact (erf) GELU over slices, in code the compiler turns into SIMD.
//!
//! The CPU path computed these one element at a time through libm (`expf` for GroupNorm's
//! SiLU, candle's float64 `erf` for GEGLU's GELU): scalar calls the compiler cannot vectorise,
//! a few percent of every UNet step and more of the VAE at full resolution (issue 17's
//! profile). Here both are written from `+ − × ÷`, comparisons and exponent-bit arithmetic
//! only, so each loop vectorises — 8 lanes with AVX2 where the CPU has it (chosen once, at run
//! time), else SSE2's 4:
//!
//! * `exp`: Cody–Waite range reduction `x = n·ln2 + r` (`|r| ≤ ln2/2`), Cephes' degree-6
//!   minimax polynomial for `e^r`, and `2^n` built in the exponent bits; inputs clamped to
//!   `[-87, 88]` (results then round to 0 or stay finite, which is all SiLU needs). Within 2
//!   ulp of libm's `expf` over that range (tested).
//! * `erf`: Abramowitz & Stegun 7.1.26 (`1 − (a₁t + … + a₅t⁵)·e^{−x²}`, `t = 1/(1 + p|x|)`),
//!   absolute error below 1.5·10⁻⁷ in exact arithmetic, 5.5·10⁻⁷ measured in f32 (tested) — the formula PyTorch's vectorised CPU `erf` uses, so GELU
//!   is computed the way diffusers' is on the CPU.
//!
//! No fused multiply-add is used (Rust never contracts `a·b + c`), so the AVX2 and the SSE2
//! builds of a loop give the same bits: results do not depend on which x86 CPU runs them, and
//! every element depends on its own input only (batch-invariant).

/// `log2(e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in a part exact in few bits and the rest (Cody–Waite), Cephes' constants.
const LN2_HI: f32 = 0.693_359_4;
/// See [`LN2_HI`].
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting `1.5·2²³` rounds an f32 of magnitude below 2²² to the nearest
/// integer (ties to even) without a rounding instruction SSE2 lacks.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Bits of [`ROUND_MAGIC`]: subtracted from the sum's bits to read the integer.
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// Inputs of `exp` are clamped to `[EXP_MIN, EXP_MAX]`.
const EXP_MIN: f32 = -87.0;
/// See [`EXP_MIN`].
const EXP_MAX: f32 = 88.0;

/// `e^x` (module docs: within 2 ulp of libm on `[-87, 88]`, clamped outside).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let x = if x > EXP_MAX { EXP_MAX } else { x };
    let shifted = x * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC_BITS);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((exponent + 127) << 23) as u32)
}

/// `x · σ(x) = x / (1 + e^{−x})`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)` (module docs: absolute error below 6·10⁻⁷ in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let a = if x < 0.0 { -x } else { x };
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 { -y } else { y }
}

/// The exact GELU, `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Defines `$name`: the function `$body` compiled twice (AVX2 and the baseline), the AVX2 copy
/// taken when the CPU has it. For loops over slices the compiler vectorises; without fused
/// multiply-adds both copies give the same bits.
macro_rules! simd_loop {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, the only requirement of `avx2`.
                #[allow(unsafe_code)]
                unsafe {
                    return avx2($($arg),*);
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_loop;

simd_loop! {
    /// `out[i] ← silu(x[i] · scale + shift)` (GroupNorm's affine, then SiLU), over the shorter.
    pub fn affine_silu(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = silu(*v * scale + shift);
        }
    }
}

simd_loop! {
    /// `out[i] ← x[i] · scale + shift` (GroupNorm's affine alone), over the shorter.
    pub fn affine(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = *v * scale + shift;
        }
    }
}

simd_loop! {
    /// `out[i] ← value[i] · gelu(gate[i])` (GEGLU), over the shortest of the three.
    pub fn mul_gelu(out: &mut [f32], value: &[f32], gate: &[f32]) {
        for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * gelu(*g);
        }
    }
}

simd_loop! {
    /// `v ← silu(v)` for every `v` of `values`.
    pub fn silu_in_place(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = silu(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 in `[lo, hi]` at `steps` evenly spaced points.
    fn grid(lo: f32, hi: f32, steps: usize) -> Vec<f32> {
        (0..=steps).map(|i| lo + (hi - lo) * i as f32 / steps as f32).collect()
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i32).abs_diff(b.to_bits() as i32)
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = (0, 0.0);
        for x in grid(-87.0, 88.0, 2_000_000) {
            let d = ulps(exp(x), x.exp());
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 2, "exp({}) is {} ulp from libm", worst.1, worst.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(EXP_MIN), "clamped below");
        assert!(exp(1000.0).is_finite(), "clamped above");
    }

    #[test]
    fn erf_and_gelu_are_within_their_bounds() {
        let mut worst_erf = 0f64;
        for x in grid(-10.0, 10.0, 400_000) {
            let want = libm_erf(f64::from(x));
            worst_erf = worst_erf.max((f64::from(erf(x)) - want).abs());
            let want_gelu = 0.5 * f64::from(x) * (1.0 + libm_erf(f64::from(x) / std::f64::consts::SQRT_2));
            let tolerance = 4e-7 * (1.0 + f64::from(x.abs()));
            assert!((f64::from(gelu(x)) - want_gelu).abs() < tolerance, "gelu({x})");
        }
        assert!(worst_erf < 6e-7, "erf is {worst_erf} from the float64 reference");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(erf(-3.0), -erf(3.0), "odd");
    }

    #[test]
    fn silu_matches_the_formula_and_its_limits() {
        for x in grid(-100.0, 100.0, 200_000) {
            let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
            assert!((f64::from(silu(x)) - want).abs() <= 1e-6 * (1.0 + want.abs()), "silu({x})");
        }
        assert_eq!(silu(200.0), 200.0);
        assert!(silu(-200.0).abs() < 1e-30);
    }

    #[test]
    fn the_simd_loops_give_the_scalar_bits_on_every_length() {
        let values: Vec<f32> = grid(-12.0, 12.0, 1003).into_iter().map(|v| v * 1.37).collect();
        for len in [0, 1, 3, 7, 8, 9, 31, 1003] {
            let mut row = vec![0.0; len];
            affine_silu(&mut row, &values[..len], 0.7, -0.2);
            for (got, x) in row.iter().zip(&values) {
                assert_eq!(got.to_bits(), silu(x * 0.7 + -0.2).to_bits(), "affine_silu, len {len}");
            }
            affine(&mut row, &values[..len], 0.7, -0.2);
            for (got, x) in row.iter().zip(&values) {
                assert_eq!(got.to_bits(), (x * 0.7 + -0.2).to_bits(), "affine, len {len}");
            }
            let mut out = vec![0.0; len];
            mul_gelu(&mut out, &values[..len], &values[1..=len]);
            for ((got, v), g) in out.iter().zip(&values).zip(&values[1..]) {
                assert_eq!(got.to_bits(), (v * gelu(*g)).to_bits(), "mul_gelu, len {len}");
            }
            let mut row = values[..len].to_vec();
            silu_in_place(&mut row);
            for (got, x) in row.iter().zip(&values) {
                assert_eq!(got.to_bits(), silu(*x).to_bits(), "silu_in_place, len {len}");
            }
        }
    }

    /// erf in f64 (the reference), from candle's implementation.
    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
