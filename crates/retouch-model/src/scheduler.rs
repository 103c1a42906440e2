//! Noise schedulers equal to diffusers' `X.from_config(<checkpoint scheduler config>, **overrides)`.
//!
//! Six schedulers: Euler-ancestral (what InstructPix2Pix checkpoints ship), Euler, DDIM
//! (η = 0), DPM++ 2M and DPM++ 2M SDE (`DPMSolverMultistepScheduler` with `algorithm_type`
//! `dpmsolver++` / `sde-dpmsolver++`) and UniPC (`UniPCMultistepScheduler`, `bh2`), plus Karras
//! sigmas (`use_karras_sigmas`) where the diffusers class has them. The checkpoint's
//! `scheduler_config.json` is read as diffusers reads it when another class is built from it:
//! each class takes the keys it knows and its own defaults for the rest (DDIM defaults to
//! `leading` spacing, the others to `linspace`), ignores keys it does not know (the timbrooks
//! config carries DPM-solver keys), and a value this module does not implement is refused by
//! name.
//!
//! Faithfulness points, each one a place where candle's own schedulers differ:
//! * Euler-family `linspace` timesteps are fractional float32 values (999, 946.42…); `leading`
//!   adds `steps_offset`; `trailing` rounds `arange(T, 0, -T/N)` half to even and subtracts 1.
//!   DPM-Solver and UniPC take `linspace(0, T - 1, N + 1)` rounded, without its last value, as
//!   integers (and `leading` divides by N + 1).
//! * Sigmas are `np.interp` of the float32 sigma table at those timesteps, in float64, stored as
//!   float32, with a final 0. Karras sigmas are computed in float64 from the first and last
//!   interpolated sigma (Euler) or from the ends of the whole table (DPM-Solver, UniPC), and
//!   mapped back to timesteps through `_sigma_to_t` against the float32 log-sigma table
//!   (fractional for Euler, rounded half to even for the multistep solvers).
//! * The step maths runs in float32 in diffusers' operation order: every per-step coefficient
//!   is a float32 scalar computed as torch computes a 0-dim tensor expression, then applied to
//!   the latents; divisions by such a scalar are true divisions. UniPC's 2×2 corrector system
//!   is solved as MKL's `sgesv` does (partial pivoting, fused multiply-add in the forward
//!   substitution, multiplication by reciprocal pivots), bit for bit on 20,000 random systems.
//! * Euler-ancestral and DPM++ 2M SDE draw noise at every step (the last included) from the
//!   image's own generator.
//!
//! A [`Schedule`] is the immutable table for one step count; a [`Sampler`] walks it for one
//! batch and owns the multistep solvers' state (previous data predictions, the last sample,
//! the warm-up counters). Every tensor operation is element-wise, so an image's result never
//! depends on the rest of its batch.

use std::collections::VecDeque;

use candle_core::{Result as CandleResult, Tensor};
use serde_json::{Map, Value};

use crate::error::ModelError;
pub use retouch_core::params::SchedulerKind;

/// How inference timesteps are spread over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `np.linspace(0, T - 1, N)` reversed (fractional for the Euler family; `N + 1` points
    /// rounded, the last dropped, for DPM-Solver and UniPC).
    Linspace,
    /// `arange(N) * (T // N)` reversed, plus `steps_offset` (`N + 1` for the multistep solvers).
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`.
    Trailing,
}

/// The training noise schedule and sampling options of one scheduler class, read from a
/// diffusers scheduler config.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// The class this config was resolved for.
    pub kind: SchedulerKind,
    /// `num_train_timesteps` (T).
    pub num_train_timesteps: usize,
    /// The betas, derived from `beta_schedule` or given as `trained_betas`.
    pub betas: Vec<f32>,
    /// `beta_schedule` is `squaredcos_cap_v2` (DPM-Solver then keeps Karras timesteps unrounded).
    pub cosine_betas: bool,
    /// `timestep_spacing`, with the class's default when absent.
    pub spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading`).
    pub steps_offset: usize,
    /// DDIM: `clip_sample` (default true) and `clip_sample_range` (default 1).
    pub clip_sample: Option<f32>,
    /// DDIM: `set_alpha_to_one` (default true).
    pub set_alpha_to_one: bool,
    /// `use_karras_sigmas` (Euler, DPM-Solver, UniPC), after the caller's override.
    pub karras_sigmas: bool,
    /// DPM-Solver and UniPC: `solver_order` (1 or 2); 1 for the single-step schedulers.
    pub solver_order: usize,
    /// DPM-Solver: `lambda_min_clipped` (−∞ by default; a cosine schedule may clip the last
    /// timesteps with it).
    pub lambda_min_clipped: f32,
}

fn config_err(key: &str, message: impl Into<String>) -> ModelError {
    ModelError::UnsupportedConfig { component: "scheduler", key: key.to_string(), message: message.into() }
}

/// The kind a checkpoint's scheduler config denotes (its `_class_name`, and for
/// `DPMSolverMultistepScheduler` its `algorithm_type`), if implemented here.
pub fn default_kind(config: &Map<String, Value>) -> Option<SchedulerKind> {
    let class = config.get("_class_name").and_then(Value::as_str)?;
    let kind = SchedulerKind::from_diffusers_class(class)?;
    if kind.diffusers_class() != SchedulerKind::DpmppTwoM.diffusers_class() {
        return Some(kind);
    }
    match config.get("algorithm_type").and_then(Value::as_str).unwrap_or("dpmsolver++") {
        "dpmsolver++" => Some(SchedulerKind::DpmppTwoM),
        "sde-dpmsolver++" => Some(SchedulerKind::DpmppTwoMSde),
        _ => None,
    }
}

impl SchedulerConfig {
    /// Resolves a checkpoint's scheduler config (any class) for `kind`, as
    /// `kind_class.from_config(config)` would (for the DPM++ kinds with their `algorithm_type`).
    ///
    /// # Errors
    /// As [`Self::resolve`].
    pub fn from_diffusers(kind: SchedulerKind, config: &Map<String, Value>) -> Result<Self, ModelError> {
        Self::resolve(kind, config, None)
    }

    /// Resolves a checkpoint's scheduler config (any class) for `kind`, as
    /// `kind_class.from_config(config, use_karras_sigmas=karras_sigmas)` would; `None` leaves
    /// `use_karras_sigmas` to the config.
    ///
    /// # Errors
    /// A key that changes the maths to something not implemented here (v-prediction,
    /// thresholding, exponential sigmas, third-order solvers, zero-SNR rescaling, an unknown
    /// beta schedule, …) is [`ModelError::UnsupportedConfig`] naming the key; so is
    /// `karras_sigmas: Some(true)` for a class without Karras sigmas (Euler-ancestral and DDIM
    /// in diffusers 0.42.1, which would ignore the option silently).
    pub fn resolve(
        kind: SchedulerKind,
        config: &Map<String, Value>,
        karras_sigmas: Option<bool>,
    ) -> Result<Self, ModelError> {
        let num = |key: &str, default: f64| -> Result<f64, ModelError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| config_err(key, format!("expected a number, found {v}"))),
            }
        };
        let boolean = |key: &str, default: bool| -> Result<bool, ModelError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| config_err(key, format!("expected a boolean, found {v}"))),
            }
        };
        let string = |key: &str, default: &str| -> Result<String, ModelError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(config_err(key, format!("expected a string, found {v}"))),
            }
        };
        let require = |key: &str, actual: String, supported: &[&str]| -> Result<(), ModelError> {
            if supported.contains(&actual.as_str()) {
                Ok(())
            } else {
                Err(config_err(key, format!("{actual:?} is not supported (supported: {supported:?})")))
            }
        };
        let refuse_true = |keys: &[&str]| -> Result<(), ModelError> {
            for key in keys {
                if boolean(key, false)? {
                    return Err(config_err(key, "true is not supported"));
                }
            }
            Ok(())
        };
        let require_null = |keys: &[&str]| -> Result<(), ModelError> {
            for key in keys {
                if !matches!(config.get(*key), None | Some(Value::Null)) {
                    return Err(config_err(key, "only null is supported"));
                }
            }
            Ok(())
        };
        let solver_order = || -> Result<usize, ModelError> {
            match num("solver_order", 2.0)? {
                1.0 => Ok(1),
                2.0 => Ok(2),
                other => Err(config_err("solver_order", format!("{other} is not supported (supported: 1, 2)"))),
            }
        };

        let num_train_timesteps = num("num_train_timesteps", 1000.0)?;
        if !(num_train_timesteps >= 2.0 && num_train_timesteps.fract() == 0.0) {
            return Err(config_err("num_train_timesteps", format!("{num_train_timesteps} is not an integer ≥ 2")));
        }
        let num_train_timesteps = num_train_timesteps as usize;
        require("prediction_type", string("prediction_type", "epsilon")?, &["epsilon"])?;
        refuse_true(&["rescale_betas_zero_snr"])?;
        let default_spacing = if kind == SchedulerKind::Ddim { "leading" } else { "linspace" };
        let spacing = match string("timestep_spacing", default_spacing)?.as_str() {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err(config_err("timestep_spacing", format!("{other:?} is not supported")));
            }
        };
        let steps_offset = num("steps_offset", 0.0)?;
        if !(steps_offset >= 0.0 && steps_offset.fract() == 0.0) {
            return Err(config_err("steps_offset", format!("{steps_offset} is not a non-negative integer")));
        }

        let beta_schedule = string("beta_schedule", "linear")?;
        let betas = match config.get("trained_betas") {
            None | Some(Value::Null) => {
                let beta_start = num("beta_start", 0.0001)? as f32;
                let beta_end = num("beta_end", 0.02)? as f32;
                match beta_schedule.as_str() {
                    "linear" => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
                    "scaled_linear" => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    "squaredcos_cap_v2" => cosine_betas(num_train_timesteps),
                    other => {
                        return Err(config_err("beta_schedule", format!("{other:?} is not supported")));
                    }
                }
            }
            Some(Value::Array(values)) => {
                let betas: Option<Vec<f32>> = values.iter().map(|v| v.as_f64().map(|b| b as f32)).collect();
                let betas = betas.ok_or_else(|| config_err("trained_betas", "expected a list of numbers"))?;
                if betas.len() != num_train_timesteps {
                    return Err(config_err(
                        "trained_betas",
                        format!("{} values for {num_train_timesteps} timesteps", betas.len()),
                    ));
                }
                betas
            }
            Some(v) => {
                return Err(config_err("trained_betas", format!("expected a list, found {v}")));
            }
        };

        let mut clip_sample = None;
        let mut set_alpha_to_one = true;
        let mut karras = false;
        let mut order = 1;
        let mut lambda_min_clipped = f32::NEG_INFINITY;
        match kind {
            SchedulerKind::Ddim => {
                refuse_true(&["thresholding"])?;
                if boolean("clip_sample", true)? {
                    clip_sample = Some(num("clip_sample_range", 1.0)? as f32);
                }
                set_alpha_to_one = boolean("set_alpha_to_one", true)?;
            }
            SchedulerKind::Euler => {
                require("interpolation_type", string("interpolation_type", "linear")?, &["linear"])?;
                refuse_true(&["use_exponential_sigmas", "use_beta_sigmas"])?;
                karras = boolean("use_karras_sigmas", false)?;
                require("timestep_type", string("timestep_type", "discrete")?, &["discrete"])?;
                require("final_sigmas_type", string("final_sigmas_type", "zero")?, &["zero"])?;
                require_null(&["sigma_min", "sigma_max"])?;
            }
            SchedulerKind::EulerAncestral => {}
            SchedulerKind::DpmppTwoM | SchedulerKind::DpmppTwoMSde => {
                // `algorithm_type` comes from the kind (an override), never from the config.
                order = solver_order()?;
                // diffusers maps the UniPC / DEIS names to midpoint; heun is another formula.
                require("solver_type", string("solver_type", "midpoint")?, &["midpoint", "logrho", "bh1", "bh2"])?;
                refuse_true(&[
                    "thresholding",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "use_lu_lambdas",
                    "use_flow_sigmas",
                    "use_dynamic_shifting",
                ])?;
                require_null(&["variance_type"])?;
                require("final_sigmas_type", string("final_sigmas_type", "zero")?, &["zero"])?;
                // With a zero final sigma diffusers always takes a first-order last step, so
                // `lower_order_final` and `euler_at_final` change nothing at order ≤ 2; they
                // are still checked to be booleans.
                boolean("lower_order_final", true)?;
                boolean("euler_at_final", false)?;
                lambda_min_clipped = match config.get("lambda_min_clipped") {
                    None | Some(Value::Null) => f32::NEG_INFINITY,
                    Some(Value::String(s)) if s == "-Infinity" => f32::NEG_INFINITY,
                    Some(v) => match v.as_f64() {
                        Some(x) if x.is_finite() => x as f32,
                        _ => return Err(config_err("lambda_min_clipped", format!("{v} is not supported"))),
                    },
                };
                karras = boolean("use_karras_sigmas", false)?;
            }
            SchedulerKind::Unipc => {
                order = solver_order()?;
                // diffusers maps the DPM-Solver names to bh2.
                require("solver_type", string("solver_type", "bh2")?, &["bh2", "midpoint", "heun", "logrho"])?;
                if !boolean("predict_x0", true)? {
                    return Err(config_err("predict_x0", "false is not supported"));
                }
                if !boolean("lower_order_final", true)? {
                    // A second-order predictor onto the zero final sigma divides by an infinite
                    // step (diffusers returns non-finite latents then).
                    return Err(config_err("lower_order_final", "false is not supported"));
                }
                match config.get("disable_corrector") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(list)) if list.is_empty() => {}
                    Some(v) => return Err(config_err("disable_corrector", format!("{v} is not supported (only [])"))),
                }
                refuse_true(&[
                    "thresholding",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "use_flow_sigmas",
                    "use_dynamic_shifting",
                ])?;
                require_null(&["solver_p", "sigma_min", "sigma_max", "shift_terminal"])?;
                require("final_sigmas_type", string("final_sigmas_type", "zero")?, &["zero"])?;
                karras = boolean("use_karras_sigmas", false)?;
            }
        }
        match karras_sigmas {
            Some(true) if !kind.supports_karras_sigmas() => {
                return Err(config_err(
                    "use_karras_sigmas",
                    format!(
                        "{kind} has no Karras sigmas: diffusers' {} has no use_karras_sigmas option",
                        kind.diffusers_class()
                    ),
                ));
            }
            Some(value) if kind.supports_karras_sigmas() => karras = value,
            _ => {}
        }

        Ok(Self {
            kind,
            num_train_timesteps,
            betas,
            cosine_betas: beta_schedule == "squaredcos_cap_v2",
            spacing,
            steps_offset: steps_offset as usize,
            clip_sample,
            set_alpha_to_one,
            karras_sigmas: karras,
            solver_order: order,
            lambda_min_clipped,
        })
    }

    /// `alphas_cumprod`: `cumprod(1 - betas)`, accumulated in double as torch's CPU kernel does,
    /// stored as float32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut acc = 1.0f64;
        self.betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect()
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up from
/// `start`, the second half down from `end`, with a float32 step.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`), max beta 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64, endpoint included (`i * step + start`, the last
/// value exactly `stop`; one value is `start`).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` in float64: `ceil(-start / -step)` values `start - i * step`.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// The float32 sigma table `((1 - ᾱ) / ᾱ) ** 0.5`, index = training timestep.
fn sigma_table(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `_convert_to_karras`: `(max^(1/ρ) + ramp · (min^(1/ρ) − max^(1/ρ)))^ρ`, ρ = 7, in float64.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: the fractional timestep of `sigma` by linear interpolation in log-sigma
/// against the float32 table `log_sigmas` (numpy's mixed float64/float32 arithmetic).
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the first index where the count of non-negative
    // distances reaches its maximum, clipped to len - 2.
    let mut count = 0usize;
    let mut best = (0usize, 0usize);
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(l) >= 0.0 {
            count += 1;
        }
        if count > best.1 {
            best = (i, count);
        }
    }
    let low_idx = best.0.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // (low - log_sigma) in float64, (low - high) in float32, as numpy types them.
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.interp(x, arange(len(table)), table)` in float64.
fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    if x >= last as f64 {
        return f64::from(table[last]);
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (lo, hi) = (f64::from(table[i]), f64::from(table[i + 1]));
    // numpy's formula: slope * (x - xp[i]) + fp[i].
    (hi - lo) * frac + lo
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: `α = 1 / √(σ² + 1)`, `σ_t = σ·α`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = log α − log σ` in float32 (+∞ at σ = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `t · c` with the float32 scalar `c` (candle's affine multiplies in float32, as torch does).
fn scale(t: &Tensor, c: f32) -> CandleResult<Tensor> {
    t * f64::from(c)
}

/// `t / c`, a true float32 division by a 0-dim tensor (candle's `t / f64` multiplies by the
/// reciprocal instead).
fn divide(t: &Tensor, c: f32) -> CandleResult<Tensor> {
    t.broadcast_div(&Tensor::new(c, t.device())?)
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], [b1, b2])` in float32 as MKL's `sgesv` computes it:
/// partial pivoting, the forward substitution fused (`b2 − l·b1` rounded once), the back
/// substitution multiplying by reciprocal pivots.
fn solve_unipc_corrector(rk: f32, b1: f32, b2: f32) -> (f32, f32) {
    let (mut a11, mut a12, mut a21, mut a22, mut c1, mut c2) = (1.0f32, 1.0f32, rk, 1.0f32, b1, b2);
    if a21.abs() > a11.abs() {
        std::mem::swap(&mut a11, &mut a21);
        std::mem::swap(&mut a12, &mut a22);
        std::mem::swap(&mut c1, &mut c2);
    }
    let l = a21 / a11;
    let u22 = a22 - l * a12;
    let y2 = (-l).mul_add(c1, c2);
    let x2 = y2 * (1.0 / u22);
    let x1 = (c1 - a12 * x2) * (1.0 / a11);
    (x1, x2)
}

/// A scheduler prepared for one number of inference steps: the timestep and sigma tables every
/// image shares. Walk it with a [`Sampler`].
#[derive(Clone, Debug)]
pub struct Schedule {
    kind: SchedulerKind,
    /// Timesteps handed to the UNet, in order (float32; integral for DDIM, DPM-Solver, UniPC).
    timesteps: Vec<f32>,
    /// Every kind but DDIM: sigmas at each timestep plus a final 0.
    sigmas: Vec<f32>,
    /// DDIM: `alphas_cumprod` and the parameters of its step.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    clip_sample: Option<f32>,
    init_noise_sigma: f32,
    /// DPM-Solver and UniPC: `solver_order`.
    solver_order: usize,
}

impl Schedule {
    /// `scheduler.set_timesteps(steps)`.
    ///
    /// # Errors
    /// `steps` must be in `1..=num_train_timesteps`, and the resulting timesteps inside the
    /// training range with a first timestep that does not repeat (diffusers would start at its
    /// second occurrence and step past the end).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, ModelError> {
        let t = config.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(ModelError::InvalidInput(format!("steps must be between 1 and {t}, got {steps}")));
        }
        let alphas_cumprod = config.alphas_cumprod();
        let table = sigma_table(&alphas_cumprod);
        let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let (timesteps, sigmas) = match config.kind {
            SchedulerKind::EulerAncestral | SchedulerKind::Euler => {
                let timesteps = euler_timesteps(config, steps);
                let interpolated: Vec<f64> = timesteps.iter().map(|&x| interp(x, &table)).collect();
                let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if config.karras_sigmas {
                    let (first, last) = (interpolated[0], interpolated[interpolated.len() - 1]);
                    let karras = karras_sigmas(last, first, steps);
                    let ts = karras.iter().map(|&s| f64::from(sigma_to_t(s, &log_sigmas) as f32)).collect();
                    (ts, karras.into_iter().map(|s| s as f32).collect())
                } else {
                    (timesteps, interpolated.into_iter().map(|s| s as f32).collect())
                };
                sigmas.push(0.0);
                (timesteps, sigmas)
            }
            SchedulerKind::Ddim => (ddim_timesteps(config, steps), Vec::new()),
            SchedulerKind::DpmppTwoM | SchedulerKind::DpmppTwoMSde | SchedulerKind::Unipc => {
                let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if config.karras_sigmas {
                    let karras = karras_sigmas(f64::from(table[0]), f64::from(table[t - 1]), steps);
                    let cast_only = config.kind != SchedulerKind::Unipc && config.cosine_betas;
                    let ts = karras
                        .iter()
                        .map(|&s| {
                            let x = sigma_to_t(s, &log_sigmas);
                            // astype(int64) truncates; DPM-Solver rounds first unless cosine.
                            if cast_only { x.trunc() } else { x.round_ties_even() }
                        })
                        .collect();
                    (ts, karras.into_iter().map(|s| s as f32).collect())
                } else {
                    let ts = multistep_timesteps(config, steps, &alphas_cumprod);
                    let sigmas = ts.iter().map(|&x| interp(x, &table) as f32).collect();
                    (ts, sigmas)
                };
                sigmas.push(0.0);
                (timesteps, sigmas)
            }
        };
        if let Some(bad) = timesteps.iter().find(|&&x| !(0.0..=(t - 1) as f64).contains(&x)) {
            return Err(ModelError::InvalidInput(format!(
                "{steps} steps with this scheduler config give timestep {bad}, outside 0..{t}"
            )));
        }
        if timesteps.len() > 1 && timesteps[1..].contains(&timesteps[0]) {
            return Err(ModelError::InvalidInput(format!(
                "{steps} steps with this scheduler config repeat the first timestep {}",
                timesteps[0]
            )));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let init_noise_sigma = match config.kind {
            SchedulerKind::EulerAncestral | SchedulerKind::Euler => {
                let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
                match config.spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                    TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
                }
            }
            _ => 1.0,
        };
        Ok(Self {
            kind: config.kind,
            timesteps: timesteps.into_iter().map(|x| x as f32).collect(),
            sigmas,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: t / steps,
            clip_sample: config.clip_sample,
            init_noise_sigma,
            solver_order: config.solver_order,
        })
    }

    /// The timesteps the UNet sees, in order.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sigmas (one more than the timesteps, the last 0); empty for DDIM.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `init_noise_sigma`: what the unscaled initial noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// Whether a step consumes a noise draw per image at every step (Euler-ancestral and
    /// DPM++ 2M SDE).
    pub fn draws_step_noise(&self) -> bool {
        matches!(self.kind, SchedulerKind::EulerAncestral | SchedulerKind::DpmppTwoMSde)
    }

    /// A fresh walk through the schedule from its first step, as the pipeline does after
    /// `set_timesteps`.
    pub fn sampler(&self) -> Sampler<'_> {
        self.sampler_from(0)
    }

    /// A fresh walk starting at step `begin` (diffusers' `set_begin_index`): the multistep
    /// solvers start their warm-up there.
    pub fn sampler_from(&self, begin: usize) -> Sampler<'_> {
        Sampler {
            schedule: self,
            index: begin,
            model_outputs: VecDeque::with_capacity(self.solver_order + 1),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
        }
    }

    /// `scale_model_input(sample, t)` at step `index`: the Euler family divides by
    /// `√(σ² + 1)`, the others return the sample unchanged.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> CandleResult<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral | SchedulerKind::Euler => {
                let sigma = self.sigma(index)?;
                sample / f64::from((sigma * sigma + 1.0).sqrt())
            }
            _ => Ok(sample.clone()),
        }
    }

    fn sigma(&self, index: usize) -> CandleResult<f32> {
        self.sigmas
            .get(index)
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("no sigma at step {index} of {}", self.timesteps.len())))
    }

    /// The single-step schedulers' `step` at `index` (their maths as before the multistep
    /// solvers existed: divisions by a scalar multiply by its reciprocal, as they always did
    /// within 1/255 of diffusers).
    fn single_step(&self, eps: &Tensor, index: usize, sample: &Tensor, noise: Option<&Tensor>) -> CandleResult<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let sigma = self.sigma(index)?;
                let sigma_to = self.sigma(index + 1)?;
                let x0 = (sample - (eps * f64::from(sigma))?)?;
                let sigma_up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
                let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
                let derivative = ((sample - &x0)? / f64::from(sigma))?;
                let dt = sigma_down - sigma;
                let prev = (sample + (derivative * f64::from(dt))?)?;
                let noise = noise.ok_or_else(|| candle_core::Error::Msg("Euler-ancestral step needs noise".into()))?;
                prev + (noise * f64::from(sigma_up))?
            }
            SchedulerKind::Euler => {
                let sigma = self.sigma(index)?;
                let x0 = (sample - (eps * f64::from(sigma))?)?;
                let derivative = ((sample - &x0)? / f64::from(sigma))?;
                let dt = self.sigma(index + 1)? - sigma;
                sample + (derivative * f64::from(dt))?
            }
            _ => {
                let t = self.timesteps[index] as usize;
                let alpha_t = self.alphas_cumprod[t];
                let alpha_prev = match t.checked_sub(self.step_ratio) {
                    Some(prev) => self.alphas_cumprod[prev],
                    None => self.final_alpha_cumprod,
                };
                let beta_t = 1.0 - alpha_t;
                let mut x0 = ((sample - (eps * f64::from(beta_t.sqrt()))?)? / f64::from(alpha_t.sqrt()))?;
                if let Some(range) = self.clip_sample {
                    x0 = x0.clamp(-range, range)?;
                }
                let direction = (eps * f64::from((1.0 - alpha_prev).sqrt()))?;
                (x0 * f64::from(alpha_prev.sqrt()))? + direction
            }
        }
    }
}

/// Euler-family timesteps (fractional float32 `linspace`), as float64 values.
fn euler_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let t = config.num_train_timesteps;
    match config.spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (t - 1) as f64, steps);
            v.reverse();
            // np.linspace(..., dtype=float32): computed in f64, then cast.
            v.into_iter().map(|x| f64::from(x as f32)).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange_down(t as f64, t as f64 / steps as f64).into_iter().map(|x| x.round_ties_even() - 1.0).collect()
        }
    }
}

/// DDIM timesteps (integers).
fn ddim_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    match config.spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (config.num_train_timesteps - 1) as f64, steps);
            v.reverse();
            v.into_iter().map(f64::round_ties_even).collect()
        }
        _ => euler_timesteps(config, steps),
    }
}

/// DPM-Solver / UniPC timesteps without Karras sigmas: `N + 1` points, the last dropped,
/// integers; DPM-Solver ends at the `lambda_min_clipped` cut.
fn multistep_timesteps(config: &SchedulerConfig, steps: usize, alphas_cumprod: &[f32]) -> Vec<f64> {
    let t = config.num_train_timesteps;
    let last = if config.kind == SchedulerKind::Unipc {
        t
    } else {
        // searchsorted(flip(λ), lambda_min_clipped): how many λ (ascending) lie below it.
        let clipped =
            alphas_cumprod.iter().filter(|&&a| lambda(a.sqrt(), (1.0 - a).sqrt()) < config.lambda_min_clipped).count();
        t - clipped
    };
    match config.spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, last as f64 - 1.0, steps + 1);
            v.reverse();
            v.truncate(steps);
            v.into_iter().map(f64::round_ties_even).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last / (steps + 1);
            (1..=steps).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => np_arange_down(last as f64, t as f64 / steps as f64)
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    }
}

/// One batch's walk through a [`Schedule`]: the step index and, for DPM-Solver and UniPC, the
/// solver state diffusers keeps on the scheduler object. Tensors hold the whole batch; every
/// update is element-wise.
#[derive(Debug)]
pub struct Sampler<'s> {
    schedule: &'s Schedule,
    /// The step the next call to [`Sampler::step`] performs.
    index: usize,
    /// Data predictions (x₀) of the latest steps, newest last, at most `solver_order`
    /// (diffusers' `model_outputs`).
    model_outputs: VecDeque<Tensor>,
    /// Steps taken so far, up to `solver_order` (the warm-up counter `lower_order_nums`).
    lower_order_nums: usize,
    /// UniPC: the (corrected) sample the last predictor started from (`last_sample`).
    last_sample: Option<Tensor>,
    /// UniPC: the order of the last predictor, which its corrector reuses (`this_order`).
    this_order: usize,
}

impl Sampler<'_> {
    /// The step the next [`Self::step`] performs.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The timestep of the next step (what the UNet is given).
    ///
    /// # Errors
    /// When every step is done.
    pub fn timestep(&self) -> CandleResult<f32> {
        self.schedule.timesteps.get(self.index).copied().ok_or_else(|| self.finished())
    }

    /// `scale_model_input(sample, t)` at the next step.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn scale_model_input(&self, sample: &Tensor) -> CandleResult<Tensor> {
        self.schedule.scale_model_input(sample, self.index)
    }

    /// Keeps only the batch rows `rows` (u32 indices, in order) of the solver's state, when
    /// images leave the batch between steps.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn retain(&mut self, rows: &Tensor) -> CandleResult<()> {
        for output in &mut self.model_outputs {
            *output = output.index_select(rows, 0)?;
        }
        if let Some(last) = &self.last_sample {
            self.last_sample = Some(last.index_select(rows, 0)?);
        }
        Ok(())
    }

    fn finished(&self) -> candle_core::Error {
        candle_core::Error::Msg(format!("step {} of a {}-step schedule", self.index, self.schedule.timesteps.len()))
    }

    /// `scheduler.step(eps, t, sample)` at the next step, all float32; advances the walk.
    /// `noise` is the step's fresh standard-normal draw (one per image, same shape as
    /// `sample`) and is required exactly when [`Schedule::draws_step_noise`].
    ///
    /// # Errors
    /// Tensor errors, a missing noise draw, or a step past the end.
    pub fn step(&mut self, eps: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> CandleResult<Tensor> {
        let k = self.index;
        let schedule = self.schedule;
        if k >= schedule.timesteps.len() {
            return Err(self.finished());
        }
        let prev = match schedule.kind {
            SchedulerKind::EulerAncestral | SchedulerKind::Euler | SchedulerKind::Ddim => {
                schedule.single_step(eps, k, sample, noise)?
            }
            SchedulerKind::DpmppTwoM | SchedulerKind::DpmppTwoMSde => self.dpm_solver_step(eps, sample, noise)?,
            SchedulerKind::Unipc => self.unipc_step(eps, sample)?,
        };
        self.index += 1;
        Ok(prev)
    }

    /// `convert_model_output`: the data prediction `(x − σ_t·ε) / α_t` at the current step.
    fn data_prediction(&self, eps: &Tensor, sample: &Tensor) -> CandleResult<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.schedule.sigma(self.index)?);
        divide(&(sample - scale(eps, sigma_t)?)?, alpha_t)
    }

    fn remember(&mut self, x0: Tensor) {
        self.model_outputs.push_back(x0);
        while self.model_outputs.len() > self.schedule.solver_order {
            self.model_outputs.pop_front();
        }
    }

    /// The latest data prediction and, when there is one, the one before.
    fn latest(&self) -> CandleResult<(&Tensor, Option<&Tensor>)> {
        let n = self.model_outputs.len();
        let m0 = self.model_outputs.back().ok_or_else(|| candle_core::Error::Msg("no model output yet".into()))?;
        Ok((m0, n.checked_sub(2).and_then(|i| self.model_outputs.get(i))))
    }

    /// `DPMSolverMultistepScheduler.step` (`dpmsolver++` or `sde-dpmsolver++`, midpoint).
    fn dpm_solver_step(&mut self, eps: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> CandleResult<Tensor> {
        let schedule = self.schedule;
        let k = self.index;
        // `Some` exactly for the SDE variant.
        let noise = match (schedule.kind == SchedulerKind::DpmppTwoMSde, noise) {
            (true, Some(noise)) => Some(noise),
            (true, None) => return Err(candle_core::Error::Msg("DPM++ 2M SDE step needs noise".into())),
            (false, _) => None,
        };
        let x0 = self.data_prediction(eps, sample)?;
        self.remember(x0);
        // The last step is first order whenever the final sigma is zero (diffusers'
        // `lower_order_final` clause `final_sigmas_type == "zero"`).
        let first_order = schedule.solver_order == 1 || self.lower_order_nums < 1 || k == schedule.timesteps.len() - 1;
        let (alpha_t, sigma_t) = alpha_sigma(schedule.sigma(k + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(schedule.sigma(k)?);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let (m0, m1) = self.latest()?;
        // D1 = (m0 − m1) / r0 of the second-order update.
        let d1 = match m1 {
            Some(m1) if !first_order => {
                let (alpha_s1, sigma_s1) = alpha_sigma(schedule.sigma(k - 1)?);
                let r0 = (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h;
                Some(scale(&(m0 - m1)?, 1.0 / r0)?)
            }
            None if !first_order => {
                return Err(candle_core::Error::Msg("second-order step without history".into()));
            }
            _ => None,
        };
        let prev = match noise {
            // sde-dpmsolver++: (σ_t/σ_s·e^−h)·x + α_t(1 − e^−2h)·D0 [+ ½α_t(1 − e^−2h)·D1]
            //                  + σ_t√(1 − e^−2h)·z
            Some(noise) => {
                let decay = (-2.0 * h).exp();
                let c = alpha_t * (1.0 - decay);
                let mut x = (scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(m0, c)?)?;
                if let Some(d1) = &d1 {
                    x = (x + scale(d1, 0.5 * c)?)?;
                }
                (x + scale(noise, sigma_t * (1.0 - decay).sqrt())?)?
            }
            // dpmsolver++: (σ_t/σ_s)·x − α_t(e^−h − 1)·D0 [− ½α_t(e^−h − 1)·D1]
            None => {
                let c = alpha_t * ((-h).exp() - 1.0);
                let x = (scale(sample, sigma_t / sigma_s0)? - scale(m0, c)?)?;
                match &d1 {
                    Some(d1) => (x - scale(d1, 0.5 * c)?)?,
                    None => x,
                }
            }
        };
        if self.lower_order_nums < schedule.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    /// `UniPCMultistepScheduler.step` (`bh2`, data prediction): correct the sample the last
    /// predictor produced with this step's model output (UniC), then predict (UniP).
    fn unipc_step(&mut self, eps: &Tensor, sample: &Tensor) -> CandleResult<Tensor> {
        let schedule = self.schedule;
        let k = self.index;
        // Converted from the uncorrected sample, as diffusers does.
        let x0 = self.data_prediction(eps, sample)?;
        let corrected = match &self.last_sample {
            Some(last) if k > 0 => self.unipc_corrector(&x0, last, self.this_order)?,
            _ => sample.clone(),
        };
        self.remember(x0);
        let order = schedule.solver_order.min(schedule.timesteps.len() - k);
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.unipc_predictor(&corrected, self.this_order)?;
        self.last_sample = Some(corrected);
        if self.lower_order_nums < schedule.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    /// `multistep_uni_p_bh_update` from `x` at the current step, of order 1 or 2.
    fn unipc_predictor(&self, x: &Tensor, order: usize) -> CandleResult<Tensor> {
        let schedule = self.schedule;
        let k = self.index;
        let (alpha_t, sigma_t) = alpha_sigma(schedule.sigma(k + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(schedule.sigma(k)?);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let (m0, mi) = self.latest()?;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let x_t = (scale(x, sigma_t / sigma_s0)? - scale(m0, alpha_t * h_phi_1)?)?;
        if order < 2 {
            return Ok(x_t);
        }
        let mi = mi.ok_or_else(|| candle_core::Error::Msg("second-order UniP without history".into()))?;
        let (alpha_si, sigma_si) = alpha_sigma(schedule.sigma(k - 1)?);
        let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
        let d1 = divide(&(mi - m0)?, rk)?;
        // rhos_p = [0.5] for order 2.
        x_t - scale(&scale(&d1, 0.5)?, alpha_t * b_h)?
    }

    /// `multistep_uni_c_bh_update`: corrects `last_sample` (the previous predictor's start)
    /// into the current step's sample using `model_t`, the current data prediction.
    fn unipc_corrector(&self, model_t: &Tensor, last_sample: &Tensor, order: usize) -> CandleResult<Tensor> {
        let schedule = self.schedule;
        let k = self.index;
        let (alpha_t, sigma_t) = alpha_sigma(schedule.sigma(k)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(schedule.sigma(k - 1)?);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let (m0, mi) = self.latest()?;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = hh.exp_m1();
        let x_t = (scale(last_sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * h_phi_1)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order < 2 {
            scale(&d1_t, 0.5)?
        } else {
            let mi = mi.ok_or_else(|| candle_core::Error::Msg("second-order UniC without history".into()))?;
            let (alpha_si, sigma_si) = alpha_sigma(schedule.sigma(k - 2)?);
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            let d1 = divide(&(mi - m0)?, rk)?;
            let b1 = h_phi_k / b_h;
            let b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h;
            let (rho0, rho1) = solve_unipc_corrector(rk, b1, b2);
            (scale(&d1, rho0)? + scale(&d1_t, rho1)?)?
        };
        x_t - scale(&correction, alpha_t * b_h)?
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn timbrooks() -> Map<String, Value> {
        serde_json::from_str(
            r#"{"_class_name":"EulerAncestralDiscreteScheduler","_diffusers_version":"0.12.0.dev0",
            "algorithm_type":"dpmsolver++","beta_end":0.012,"beta_schedule":"scaled_linear","beta_start":0.00085,
            "clip_sample":false,"dynamic_thresholding_ratio":0.995,"lower_order_final":true,
            "num_train_timesteps":1000,"prediction_type":"epsilon","sample_max_value":1.0,"set_alpha_to_one":false,
            "skip_prk_steps":true,"solver_order":2,"solver_type":"midpoint","steps_offset":1,"thresholding":false,
            "trained_betas":null}"#,
        )
        .expect("valid json")
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the reference values as diffusers prints them
    fn euler_ancestral_linspace_matches_reference_table() {
        let cfg = SchedulerConfig::from_diffusers(SchedulerKind::EulerAncestral, &timbrooks()).expect("config");
        let s = Schedule::new(&cfg, 20).expect("schedule");
        let ts = s.timesteps();
        for (a, b) in ts[..4].iter().zip([999.0, 946.42108, 893.84210, 841.26318]) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        for (a, b) in s.sigmas()[..4].iter().zip([14.61464691, 10.74685001, 8.08153629, 6.20495176]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(*s.sigmas().last().expect("nonempty"), 0.0);
        assert!((s.init_noise_sigma() - 14.6146469).abs() < 1e-5);
    }

    #[test]
    fn ddim_defaults_to_leading_with_offset() {
        let cfg = SchedulerConfig::from_diffusers(SchedulerKind::Ddim, &timbrooks()).expect("config");
        assert_eq!(cfg.spacing, TimestepSpacing::Leading);
        let s = Schedule::new(&cfg, 10).expect("schedule");
        assert_eq!(s.timesteps()[..3], [901.0, 801.0, 701.0]);
    }

    #[test]
    fn dpm_solver_timesteps_drop_the_last_linspace_point_and_round_half_to_even() {
        let cfg = SchedulerConfig::from_diffusers(SchedulerKind::DpmppTwoM, &timbrooks()).expect("config");
        let s = Schedule::new(&cfg, 10).expect("schedule");
        // linspace(0, 999, 11) = 0, 99.9, …, 499.5, …, 999 → reversed, last dropped, rounded.
        assert_eq!(s.timesteps(), [999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]);
        assert_eq!(s.init_noise_sigma(), 1.0);
        assert_eq!(s.sigmas().len(), 11);
        assert_eq!(*s.sigmas().last().expect("nonempty"), 0.0);
    }

    #[test]
    fn karras_sigmas_span_the_table_and_map_back_to_its_ends() {
        let cfg = SchedulerConfig::resolve(SchedulerKind::Unipc, &timbrooks(), Some(true)).expect("config");
        let s = Schedule::new(&cfg, 8).expect("schedule");
        let table = sigma_table(&cfg.alphas_cumprod());
        assert_eq!(s.sigmas()[0], table[999]);
        assert!((s.sigmas()[7] - table[0]).abs() <= f32::EPSILON * table[0]);
        assert_eq!((s.timesteps()[0], s.timesteps()[7]), (999.0, 0.0));
        // ρ = 7 spends most steps at low noise: the decrease slows down.
        let sig = s.sigmas();
        assert!(sig.windows(3).take(6).all(|w| w[0] - w[1] > w[1] - w[2]), "{sig:?}");
    }

    #[test]
    fn sigma_to_t_inverts_the_table_between_and_beyond_its_entries() {
        let table = sigma_table(
            &SchedulerConfig::from_diffusers(SchedulerKind::Euler, &timbrooks()).expect("c").alphas_cumprod(),
        );
        let logs: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 17, 500, 998, 999] {
            assert!((sigma_to_t(f64::from(table[t]), &logs) - t as f64).abs() < 1e-4, "t = {t}");
        }
        let mid = (f64::from(table[10]).ln() + f64::from(table[11]).ln()) / 2.0;
        assert!((sigma_to_t(mid.exp(), &logs) - 10.5).abs() < 1e-4);
        assert_eq!(sigma_to_t(1e-6, &logs), 0.0, "below the table: clipped to t = 0");
        assert_eq!(sigma_to_t(1e6, &logs), 999.0, "above the table: clipped to the last");
    }

    #[test]
    fn the_unipc_corrector_system_is_solved_with_pivoting() {
        for (rk, b1, b2) in [(-0.5f32, 0.3f32, -1.25f32), (-2.5, 0.7, 0.1), (-1.0, 1.0, 2.0), (-0.05, -3.0, 4.0)] {
            let (x1, x2) = solve_unipc_corrector(rk, b1, b2);
            // [[1, 1], [rk, 1]] · x = b
            assert!((x1 + x2 - b1).abs() < 1e-5 * b1.abs().max(1.0), "rk {rk}");
            assert!((rk * x1 + x2 - b2).abs() < 1e-5 * b2.abs().max(1.0), "rk {rk}");
        }
    }

    #[test]
    fn a_sampler_refuses_missing_noise_and_steps_past_the_end() {
        let cfg = SchedulerConfig::from_diffusers(SchedulerKind::DpmppTwoMSde, &timbrooks()).expect("config");
        let s = Schedule::new(&cfg, 2).expect("schedule");
        assert!(s.draws_step_noise());
        let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).expect("tensor");
        let mut sampler = s.sampler();
        let err = sampler.step(&x, &x, None).expect_err("the SDE needs noise");
        assert!(err.to_string().contains("needs noise"), "{err}");
        assert_eq!(sampler.index(), 0, "a failed step does not advance");
        let x = sampler.step(&x, &x, Some(&x)).expect("step 0");
        let _ = sampler.step(&x, &x, Some(&x)).expect("step 1");
        assert!(sampler.step(&x, &x, Some(&x)).is_err(), "only two steps");
    }

    #[test]
    fn the_default_kind_follows_class_and_algorithm_type() {
        let mut cfg = timbrooks();
        assert_eq!(default_kind(&cfg), Some(SchedulerKind::EulerAncestral));
        cfg.insert("_class_name".into(), Value::String("DPMSolverMultistepScheduler".into()));
        assert_eq!(default_kind(&cfg), Some(SchedulerKind::DpmppTwoM));
        cfg.insert("algorithm_type".into(), Value::String("sde-dpmsolver++".into()));
        assert_eq!(default_kind(&cfg), Some(SchedulerKind::DpmppTwoMSde));
        cfg.insert("algorithm_type".into(), Value::String("dpmsolver".into()));
        assert_eq!(default_kind(&cfg), None, "DPM-Solver (not ++) is not implemented");
        cfg.insert("_class_name".into(), Value::String("UniPCMultistepScheduler".into()));
        assert_eq!(default_kind(&cfg), Some(SchedulerKind::Unipc));
        cfg.insert("_class_name".into(), Value::String("PNDMScheduler".into()));
        assert_eq!(default_kind(&cfg), None);
    }

    #[test]
    fn unsupported_keys_are_named() {
        let mut cfg = timbrooks();
        cfg.insert("prediction_type".into(), Value::String("v_prediction".into()));
        let err = SchedulerConfig::from_diffusers(SchedulerKind::Euler, &cfg).expect_err("must fail");
        assert!(err.to_string().contains("prediction_type"), "{err}");
    }
}
