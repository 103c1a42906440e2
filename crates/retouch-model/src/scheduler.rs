//! Noise schedulers equal to diffusers' `X.from_config(<checkpoint scheduler config>)`.
//!
//! Three schedulers: Euler-ancestral (what InstructPix2Pix checkpoints ship), Euler and DDIM
//! (η = 0). The checkpoint's `scheduler_config.json` is read as diffusers reads it when
//! another class is built from it: each class takes the keys it knows and its own defaults for
//! the rest (DDIM defaults to `leading` spacing, the Euler family to `linspace`), and ignores
//! keys it does not know (the timbrooks config carries DPM-solver keys).
//!
//! Faithfulness points, each one a place where candle's own schedulers differ:
//! * `linspace` timesteps are fractional float32 values (999, 946.42…); `leading` adds
//!   `steps_offset`; `trailing` rounds `arange(T, 0, -T/N)` half to even and subtracts 1.
//! * Euler sigmas are `np.interp` of the float32 sigma table at those timesteps, in float64,
//!   stored as float32, with a final 0.
//! * The step maths runs in float32 in diffusers' operation order; Euler-ancestral draws noise
//!   at every step (the last included) from the image's own generator.

use candle_core::{Result as CandleResult, Tensor};
use serde_json::{Map, Value};

use crate::error::ModelError;
pub use retouch_core::params::SchedulerKind;

/// How inference timesteps are spread over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `np.linspace(0, T - 1, N)` reversed (fractional for the Euler family).
    Linspace,
    /// `arange(N) * (T // N)` reversed, plus `steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`.
    Trailing,
}

/// The training noise schedule and sampling options shared by the three schedulers, read from
/// a diffusers scheduler config for one target class.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// The class this config was resolved for.
    pub kind: SchedulerKind,
    /// `num_train_timesteps` (T).
    pub num_train_timesteps: usize,
    /// The betas, derived from `beta_schedule` or given as `trained_betas`.
    pub betas: Vec<f32>,
    /// `timestep_spacing`, with the class's default when absent.
    pub spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading`).
    pub steps_offset: usize,
    /// DDIM: `clip_sample` (default true) and `clip_sample_range` (default 1).
    pub clip_sample: Option<f32>,
    /// DDIM: `set_alpha_to_one` (default true).
    pub set_alpha_to_one: bool,
}

fn config_err(key: &str, message: impl Into<String>) -> ModelError {
    ModelError::UnsupportedConfig { component: "scheduler", key: key.to_string(), message: message.into() }
}

impl SchedulerConfig {
    /// Resolves a checkpoint's scheduler config (any class) for `kind`, as
    /// `kind_class.from_config(config, **overrides)` would.
    ///
    /// # Errors
    /// A key that changes the maths to something not implemented here (v-prediction,
    /// thresholding, Karras sigmas, zero-SNR rescaling, an unknown beta schedule, …) is
    /// [`ModelError::UnsupportedConfig`] naming the key.
    pub fn from_diffusers(kind: SchedulerKind, config: &Map<String, Value>) -> Result<Self, ModelError> {
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

        let num_train_timesteps = num("num_train_timesteps", 1000.0)?;
        if !(num_train_timesteps >= 2.0 && num_train_timesteps.fract() == 0.0) {
            return Err(config_err("num_train_timesteps", format!("{num_train_timesteps} is not an integer ≥ 2")));
        }
        let num_train_timesteps = num_train_timesteps as usize;
        require("prediction_type", string("prediction_type", "epsilon")?, &["epsilon"])?;
        if boolean("rescale_betas_zero_snr", false)? {
            return Err(config_err("rescale_betas_zero_snr", "true is not supported"));
        }
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

        let betas = match config.get("trained_betas") {
            None | Some(Value::Null) => {
                let beta_start = num("beta_start", 0.0001)? as f32;
                let beta_end = num("beta_end", 0.02)? as f32;
                match string("beta_schedule", "linear")?.as_str() {
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
        match kind {
            SchedulerKind::Ddim => {
                if boolean("thresholding", false)? {
                    return Err(config_err("thresholding", "true is not supported"));
                }
                if boolean("clip_sample", true)? {
                    clip_sample = Some(num("clip_sample_range", 1.0)? as f32);
                }
                set_alpha_to_one = boolean("set_alpha_to_one", true)?;
            }
            SchedulerKind::Euler => {
                require("interpolation_type", string("interpolation_type", "linear")?, &["linear"])?;
                for key in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"] {
                    if boolean(key, false)? {
                        return Err(config_err(key, "true is not supported"));
                    }
                }
                require("timestep_type", string("timestep_type", "discrete")?, &["discrete"])?;
                require("final_sigmas_type", string("final_sigmas_type", "zero")?, &["zero"])?;
                for key in ["sigma_min", "sigma_max"] {
                    if !matches!(config.get(key), None | Some(Value::Null)) {
                        return Err(config_err(key, "only null is supported"));
                    }
                }
            }
            SchedulerKind::EulerAncestral => {}
        }

        Ok(Self {
            kind,
            num_train_timesteps,
            betas,
            spacing,
            steps_offset: steps_offset as usize,
            clip_sample,
            set_alpha_to_one,
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

/// `np.linspace(0, stop, num)` in float64, endpoint included.
fn np_linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` in float64: `ceil(-start / -step)` values `start - i * step`.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// A scheduler prepared for one number of inference steps: the timestep table and the state
/// every image shares. Per-image state (latents, generators) belongs to the caller.
#[derive(Clone, Debug)]
pub struct Schedule {
    kind: SchedulerKind,
    /// Timesteps handed to the UNet, in order (float32; integral for DDIM).
    timesteps: Vec<f32>,
    /// Euler family: sigmas at each timestep plus a final 0.
    sigmas: Vec<f32>,
    /// DDIM: `alphas_cumprod` and the parameters of its step.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    clip_sample: Option<f32>,
    init_noise_sigma: f32,
}

impl Schedule {
    /// `scheduler.set_timesteps(steps)`.
    ///
    /// # Errors
    /// `steps` must be in `1..=num_train_timesteps`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, ModelError> {
        let t = config.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(ModelError::InvalidInput(format!("steps must be between 1 and {t}, got {steps}")));
        }
        let alphas_cumprod = config.alphas_cumprod();
        let euler_family = config.kind != SchedulerKind::Ddim;
        let timesteps: Vec<f64> = match config.spacing {
            TimestepSpacing::Linspace => {
                let mut v = np_linspace((t - 1) as f64, steps);
                v.reverse();
                if euler_family {
                    // np.linspace(..., dtype=float32): computed in f64, then cast.
                    v.into_iter().map(|x| f64::from(x as f32)).collect()
                } else {
                    v.into_iter().map(f64::round_ties_even).collect()
                }
            }
            TimestepSpacing::Leading => {
                let ratio = t / steps;
                (0..steps).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
            }
            TimestepSpacing::Trailing => np_arange_down(t as f64, t as f64 / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        };
        if let Some(bad) = timesteps.iter().find(|&&x| x < 0.0 || x > (t - 1) as f64) {
            return Err(ModelError::InvalidInput(format!(
                "{steps} steps with this scheduler config give timestep {bad}, outside 0..{t}"
            )));
        }

        let sigmas = if euler_family {
            let table: Vec<f32> = alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
            let mut s: Vec<f32> = timesteps.iter().map(|&x| interp(x, &table) as f32).collect();
            s.push(0.0);
            s
        } else {
            Vec::new()
        };
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let init_noise_sigma = if euler_family {
            let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
            match config.spacing {
                TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            }
        } else {
            1.0
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
        })
    }

    /// The kind of scheduler this schedule steps.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timesteps the UNet sees, in order.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The Euler family's sigmas (one more than the timesteps); empty for DDIM.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `init_noise_sigma`: what the unscaled initial noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// Whether `step` consumes a noise draw per image at every step.
    pub fn draws_step_noise(&self) -> bool {
        self.kind == SchedulerKind::EulerAncestral
    }

    /// `scale_model_input(sample, t)` at step `index`.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> CandleResult<Tensor> {
        match self.kind {
            SchedulerKind::Ddim => Ok(sample.clone()),
            _ => {
                let sigma = self.sigmas[index];
                sample / f64::from((sigma * sigma + 1.0).sqrt())
            }
        }
    }

    /// `scheduler.step(eps, t, sample)` at step `index`, all float32. `noise` is the step's
    /// fresh standard-normal draw (one per image, same shape as `sample`) and is required
    /// exactly when [`Self::draws_step_noise`].
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn step(&self, eps: &Tensor, index: usize, sample: &Tensor, noise: Option<&Tensor>) -> CandleResult<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let sigma = self.sigmas[index];
                let sigma_to = self.sigmas[index + 1];
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
                let sigma = self.sigmas[index];
                let x0 = (sample - (eps * f64::from(sigma))?)?;
                let derivative = ((sample - &x0)? / f64::from(sigma))?;
                let dt = self.sigmas[index + 1] - sigma;
                sample + (derivative * f64::from(dt))?
            }
            SchedulerKind::Ddim => {
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
    fn unsupported_keys_are_named() {
        let mut cfg = timbrooks();
        cfg.insert("prediction_type".into(), Value::String("v_prediction".into()));
        let err = SchedulerConfig::from_diffusers(SchedulerKind::Euler, &cfg).expect_err("must fail");
        assert!(err.to_string().contains("prediction_type"), "{err}");
    }
}
