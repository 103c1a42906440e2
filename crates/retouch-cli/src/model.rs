//! The one model loader: [`ModelSettings`] (the worker config's `[model]` section, or the
//! [`ModelArgs`] flags every command shares) → a loaded [`InstructPix2Pix`]. `retouch edit`,
//! `batch`, `bench`, `worker` and `fetch-model` all come through here, so a model source that
//! works for one (a directory, `hf:OWNER/NAME[@REV]`, `s3://bucket/prefix/`) works for all,
//! with the same flags, the same errors and the same exit codes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use retouch_core::safety::SafetyPolicy;
use retouch_model::{
    AttentionChoice, ConvChoice, DeviceSpec, InstructPix2Pix, KernelChoice, LoadOptions, ModelError, ModelSource,
};
use retouch_s3::{S3Settings, S3Store};
use serde::{Deserialize, Serialize};

use crate::cli_error::bad_input;

/// Which checkpoint, where it runs and how: the `[model]` section of the worker config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A diffusers directory, `hf:OWNER/NAME[@REVISION]` (Hugging Face cache: `HF_HOME`,
    /// `HF_HUB_OFFLINE`) or `s3://bucket/prefix/` (mirrored once into
    /// [`cache_dir`](Self::cache_dir) and verified).
    pub source: String,
    /// Weight variant: `fp16` loads `*.fp16.safetensors`; empty for the default files. (The
    /// timbrooks fp16 weights live on a branch instead: `hf:timbrooks/instruct-pix2pix@fp16`.)
    pub variant: String,
    /// Local mirror of `s3://` models (Hub models use the Hugging Face cache).
    pub cache_dir: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    pub device: String,
    /// Compute precision: `auto` (f32 on the CPU, f16 on CUDA), `f32`, `f16` or `bf16` (on the
    /// CPU: oneDNN's bf16 products, docs/model.md).
    pub dtype: String,
    /// Convolutions: `auto` (cuDNN when the build has it and runs on CUDA; oneDNN on the CPU
    /// when libdnnl.so.2 is installed), `cudnn`, `im2col` or `onednn` (docs/gpu.md,
    /// docs/model.md).
    pub conv: String,
    /// Attention: `auto` (flash attention when the build has it, on CUDA in f16/bf16),
    /// `flash` or `math`.
    pub attention: String,
    /// The safety checker: `auto` runs it exactly when diffusers does — whenever
    /// `model_index.json` names one (`timbrooks/instruct-pix2pix` does, though it says
    /// `requires_safety_checker: false`) — and a flagged output is black; `on` requires one;
    /// `off` never loads it (nor downloads its files); `block` requires one and fails a
    /// flagged edit (error kind `nsfw`, no output).
    pub safety_checker: SafetyPolicy,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            source: "hf:timbrooks/instruct-pix2pix".into(),
            variant: String::new(),
            cache_dir: PathBuf::from("/var/cache/retouch/models"),
            device: "cpu".into(),
            dtype: "auto".into(),
            conv: "auto".into(),
            attention: "auto".into(),
            safety_checker: SafetyPolicy::Auto,
        }
    }
}

/// The parsed, checked form of [`ModelSettings`].
struct Resolved {
    device: DeviceSpec,
    dtype: Option<candle_core::DType>,
    kernels: KernelChoice,
}

impl ModelSettings {
    /// Checks every value that can be checked without the model (the source's syntax, the
    /// device, dtype and kernel names).
    ///
    /// # Errors
    /// A message naming the key (`device "tpu": …`).
    pub fn validate(&self) -> Result<(), String> {
        self.resolve().map(|_| ())?;
        if !self.source.starts_with("s3://") {
            self.source.parse::<ModelSource>().map_err(|e| format!("source {:?}: {e}", self.source))?;
        }
        Ok(())
    }

    fn resolve(&self) -> Result<Resolved, String> {
        let device = self.device.parse().map_err(|e: ModelError| format!("device {:?}: {e}", self.device))?;
        let dtype =
            retouch_model::device::parse_dtype(&self.dtype).map_err(|e| format!("dtype {:?}: {e}", self.dtype))?;
        let conv: ConvChoice = self.conv.parse().map_err(|e: ModelError| format!("conv {:?}: {e}", self.conv))?;
        let attention: AttentionChoice =
            self.attention.parse().map_err(|e: ModelError| format!("attention {:?}: {e}", self.attention))?;
        Ok(Resolved { device, dtype, kernels: KernelChoice { conv, attention } })
    }

    fn variant(&self) -> Option<&str> {
        (!self.variant.is_empty()).then_some(self.variant.as_str())
    }

    /// A local directory holding the checkpoint: mirrors an `s3://` prefix into
    /// [`cache_dir`](Self::cache_dir) (with `s3`), downloads a Hub model into the Hugging Face
    /// cache (the safety checker's files only when the policy runs it), or checks a directory.
    /// Blocking; `runtime` drives the S3 calls.
    ///
    /// # Errors
    /// Bad input (exit 2) for an unusable source or a directory without a checkpoint;
    /// download failures otherwise.
    pub fn fetch(&self, s3: &S3Settings, runtime: &tokio::runtime::Handle) -> anyhow::Result<PathBuf> {
        if self.source.starts_with("s3://") {
            let prefix = if self.source.ends_with('/') { self.source.clone() } else { format!("{}/", self.source) };
            let cache_dir = self.cache_dir.clone();
            return runtime.block_on(async {
                let store = S3Store::new(s3.clone()).await.context("cannot set up S3 for the model")?;
                store
                    .sync_prefix(&prefix, &cache_dir)
                    .await
                    .with_context(|| format!("cannot mirror the model {prefix} into {}", cache_dir.display()))
            });
        }
        let source: ModelSource = self.source.parse().map_err(|e: ModelError| bad_input(e.to_string()))?;
        source.resolve(self.variant(), self.safety_checker).map_err(|e| match e {
            ModelError::MissingFile(path) => bad_input(format!(
                "model {}: no diffusers checkpoint here ({} is missing)",
                self.source,
                path.display()
            )),
            other => anyhow::Error::new(other).context(format!("cannot fetch model {source}")),
        })
    }

    /// Fetches (see [`fetch`](Self::fetch)) and loads the model. Blocking.
    ///
    /// # Errors
    /// Bad input (exit 2) for unusable settings, a lever this build or device cannot run, or a
    /// safety policy the checkpoint cannot honour; fetch and load failures otherwise.
    pub fn load(&self, s3: &S3Settings, runtime: &tokio::runtime::Handle) -> anyhow::Result<InstructPix2Pix> {
        let Resolved { device, dtype, kernels } = self.resolve().map_err(bad_input)?;
        let dir = self.fetch(s3, runtime)?;
        let options = LoadOptions {
            device,
            variant: self.variant().map(str::to_string),
            dtype,
            kernels,
            safety_checker: self.safety_checker,
        };
        InstructPix2Pix::load(&dir, &self.source, &options).map_err(|e| match e {
            ModelError::Device(message) | ModelError::SafetyChecker(message) => bad_input(message),
            other => anyhow::Error::new(other).context(format!("cannot load model {}", self.source)),
        })
    }
}

/// The model flags of `edit`, `batch`, `bench` and `fetch-model`: the fields of
/// [`ModelSettings`]. A flag not given takes the `[model]` value the worker would use: for
/// `edit`, `batch` and `bench` the default overridden by the environment (`RETOUCH_MODEL_SOURCE`,
/// `RETOUCH_MODEL_DEVICE`, … and the deprecated `RETOUCH_MODEL`, `RETOUCH_DEVICE` with a
/// warning), for `fetch-model` the config file's too. S3 models use the `RETOUCH_S3_*`
/// variables for the store.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Checkpoint: a diffusers directory, hf:OWNER/NAME[@REVISION] or s3://bucket/prefix/
    /// [default: hf:timbrooks/instruct-pix2pix].
    #[arg(long)]
    pub model: Option<String>,
    /// Weight variant to load, e.g. fp16 for `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Local mirror of s3:// models [default: /var/cache/retouch/models]. (`--cache-dir`, its
    /// name in `fetch-model` before the model flags were one set, still works.)
    #[arg(long, alias = "cache-dir")]
    pub model_cache_dir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Compute precision: auto (f32 on the CPU, f16 on CUDA), f32, f16 or bf16 (on the CPU:
    /// oneDNN's bf16 products; needs libdnnl2 and AVX512-BF16) [default: auto].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Convolutions: auto (cuDNN when this build has it and runs on CUDA; on the CPU oneDNN
    /// when libdnnl.so.2 is installed, else im2col), cudnn, im2col (candle's on CUDA, the
    /// crate's own on the CPU), or onednn (CPU, f32: oneDNN for convolutions, linear layers
    /// and attention) [default: auto].
    #[arg(long, value_name = "auto|cudnn|im2col|onednn")]
    pub conv: Option<String>,
    /// Attention: auto (flash attention when this build has it, on CUDA in f16/bf16), flash,
    /// or math (matmul, softmax, matmul) [default: auto].
    #[arg(long, value_name = "auto|flash|math")]
    pub attention: Option<String>,
    /// Safety checker: auto (as diffusers: run it when the checkpoint ships one; a flagged
    /// output is black), on (require one), off (never), block (require one; a flagged image is
    /// not written and fails) [default: auto].
    #[arg(long, value_name = "auto|on|off|block")]
    pub safety_checker: Option<SafetyPolicy>,
}

impl ModelArgs {
    /// `base` with the flags that were given; checked.
    ///
    /// # Errors
    /// Bad input (exit 2) naming the flag's value.
    pub fn over(&self, base: &ModelSettings) -> anyhow::Result<ModelSettings> {
        let pick = |flag: &Option<String>, base: &String| flag.clone().unwrap_or_else(|| base.clone());
        let settings = ModelSettings {
            source: pick(&self.model, &base.source),
            variant: pick(&self.variant, &base.variant),
            cache_dir: self.model_cache_dir.clone().unwrap_or_else(|| base.cache_dir.clone()),
            device: pick(&self.device, &base.device),
            dtype: pick(&self.dtype, &base.dtype),
            conv: pick(&self.conv, &base.conv),
            attention: pick(&self.attention, &base.attention),
            safety_checker: self.safety_checker.unwrap_or(base.safety_checker),
        };
        // The messages start with the key, which is the flag's name (`source` is `--model`).
        settings.validate().map_err(|e| {
            bad_input(format!("--{}", e.strip_prefix("source").map_or(e.clone(), |rest| format!("model{rest}"))))
        })?;
        Ok(settings)
    }

    /// The flags over the `[model]` section as the environment sets it (deprecation warnings
    /// logged).
    ///
    /// # Errors
    /// As [`over`](Self::over); bad input for invalid `RETOUCH_*` variables.
    pub fn settings(&self) -> anyhow::Result<ModelSettings> {
        self.over(&crate::worker::load_config(None)?.model)
    }
}

/// S3 settings for a command that is not the worker (an `s3://` model in `edit`, `batch` or
/// `bench`): `[s3]` from the `RETOUCH_S3_*` variables, as the worker reads them.
///
/// # Errors
/// Bad input for invalid variables.
pub fn s3_from_env() -> anyhow::Result<S3Settings> {
    crate::config::WorkerConfig::load(None::<&Path>, std::env::vars())
        .map(|loaded| loaded.config.s3)
        .map_err(|e| bad_input(format!("configuration: {e}")))
}

/// Loads the model of a one-machine command (`edit`, `batch`, `bench`) from its flags, on this
/// thread (it blocks; never call it from async code), with a private runtime for an `s3://`
/// source. The runtime has a worker thread of its own: [`ModelSettings::load`] drives it through
/// a `Handle`, which on a current-thread runtime would never poll the S3 calls' I/O.
///
/// # Errors
/// As [`ModelSettings::load`].
pub fn load_blocking(settings: &ModelSettings) -> anyhow::Result<InstructPix2Pix> {
    // A worker thread of its own: `load` drives the runtime through a `Handle`, which on a
    // current-thread runtime would never poll the S3 calls' I/O.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let s3 = if settings.source.starts_with("s3://") { s3_from_env()? } else { S3Settings::default() };
    settings.load(&s3, runtime.handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_base_and_bad_values_name_their_key() {
        let args = ModelArgs { device: Some("cuda:1".into()), variant: Some("fp16".into()), ..ModelArgs::default() };
        let base = ModelSettings { source: "/models/x".into(), ..ModelSettings::default() };
        let s = args.over(&base).expect("valid");
        assert_eq!((s.source.as_str(), s.device.as_str(), s.variant.as_str()), ("/models/x", "cuda:1", "fp16"));
        for (args, needle) in [
            (ModelArgs { device: Some("tpu".into()), ..ModelArgs::default() }, "--device \"tpu\""),
            (ModelArgs { dtype: Some("f8".into()), ..ModelArgs::default() }, "--dtype \"f8\""),
            (ModelArgs { conv: Some("fft".into()), ..ModelArgs::default() }, "--conv \"fft\""),
            (ModelArgs { attention: Some("sparse".into()), ..ModelArgs::default() }, "--attention \"sparse\""),
        ] {
            let e = args.over(&ModelSettings::default()).expect_err("invalid").to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
