//! The worker's configuration: one flat, typed, documented tree.
//!
//! Sources, later ones winning: the defaults in this file, an optional TOML file
//! (`--config`, documented example `config/worker.toml`), then environment variables — every
//! key `k` is overridable as `RETOUCH_<K>` (upper-case), e.g. `RETOUCH_AMQP_URL`,
//! `RETOUCH_MAX_BATCH`. S3 credentials come from the standard `AWS_*` chain, never from here.
//! Unknown keys are errors; the effective config is logged once with secrets redacted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use retouch_core::redact::redact_url;
use retouch_core::safety::SafetyPolicy;
use serde::{Deserialize, Serialize};

/// Everything `retouch worker` can be told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    // --- Broker -------------------------------------------------------------------------
    /// AMQP URL of the broker (`amqp://user:password@host:5672/vhost`, `amqps://` for TLS).
    /// `?heartbeat=N` sets the heartbeat. Holds a secret: set it from a Secret in production.
    pub amqp_url: String,
    /// Direct exchange jobs are published to.
    pub jobs_exchange: String,
    /// Quorum queue the workers consume.
    pub jobs_queue: String,
    /// Topic exchange results are published to (routing key `<status>.<campaign>`).
    pub results_exchange: String,
    /// Exchange dead-lettered jobs go to.
    pub dead_letter_exchange: String,
    /// Quorum queue holding dead-lettered jobs.
    pub dead_letter_queue: String,
    /// Declare exchanges, queues and bindings at start (idempotent). Set `false` when the
    /// broker is pre-provisioned (`config/rabbitmq/definitions.json`).
    pub declare_topology: bool,
    /// Deliveries per job before it is dead-lettered (`x-delivery-limit`): transient failures
    /// are retried until then. Must match an existing queue's argument.
    pub delivery_limit: u32,
    /// Unacknowledged deliveries this worker holds (`basic.qos`). 0 = 3 × `max_batch`: one
    /// batch being prepared, one being inferred, one being uploaded. Larger values pre-fetch
    /// more but hold jobs away from other workers and toward RabbitMQ's `consumer_timeout`.
    pub prefetch: u16,
    /// First retry delay of a transient failure; doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of the retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,

    // --- Storage ------------------------------------------------------------------------
    /// Custom S3 endpoint (MinIO, Ceph, R2, …); empty for AWS S3.
    pub s3_endpoint: String,
    /// S3 region; empty = from `AWS_REGION` / the profile.
    pub s3_region: String,
    /// Path-style addressing (`host/bucket/key`): needed by most S3-compatible stores.
    /// Defaults to true when `s3_endpoint` is set.
    pub s3_force_path_style: Option<bool>,
    /// TCP connect timeout for S3.
    #[serde(with = "humantime_serde")]
    pub s3_connect_timeout: Duration,
    /// Timeout of one S3 call including SDK retries (bodies are bounded separately).
    #[serde(with = "humantime_serde")]
    pub s3_operation_timeout: Duration,
    /// Attempts per S3 call inside the SDK (jittered backoff on 5xx and throttling).
    pub s3_max_attempts: u32,
    /// Where outputs go when a job names none: `<output_prefix>/<job_id>.<ext>`.
    pub output_prefix: String,
    /// Largest accepted input object, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted input image (width × height, before resizing).
    pub max_input_pixels: u64,

    // --- Model --------------------------------------------------------------------------
    /// Checkpoint: a directory, `hf:OWNER/NAME[@REVISION]` or `s3://bucket/prefix/`
    /// (synced once into `model_cache_dir`).
    pub model: String,
    /// Weight variant, e.g. `fp16` for `*.fp16.safetensors`; empty for the default files.
    pub model_variant: String,
    /// Local cache for `s3://` models (Hub models use the Hugging Face cache, `HF_HOME`).
    pub model_cache_dir: PathBuf,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// The safety checker: `auto` runs it when the checkpoint ships one (as diffusers, even
    /// with `requires_safety_checker: false`) and writes flagged images black; `on` requires
    /// one; `off` never loads it; `block` requires one and fails flagged jobs (`nsfw`, dead-
    /// lettered, no output). The checker's files are fetched only when it runs.
    pub safety_checker: SafetyPolicy,

    // --- Batching -----------------------------------------------------------------------
    /// Most compatible jobs (same processed size, steps, scheduler) per model call. Each
    /// image runs three UNet rows per step, so GPU memory grows ~3× per image; 4 fits a
    /// 24 GB card at 512 px in f16. 1 disables batching.
    pub max_batch: usize,
    /// Longest a job waits for companions before its batch starts anyway.
    #[serde(with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// Deadline of one model call; a batch past it fails with `timeout`.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,

    // --- Operations ---------------------------------------------------------------------
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    /// On SIGTERM: time to finish the running batch before giving it back. Keep it below
    /// Kubernetes' `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Name reported in results; empty = the host name.
    pub worker_name: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            jobs_exchange: "retouch.jobs".into(),
            jobs_queue: "retouch.jobs".into(),
            results_exchange: "retouch.results".into(),
            dead_letter_exchange: "retouch.dlx".into(),
            dead_letter_queue: "retouch.dead".into(),
            declare_topology: true,
            delivery_limit: 5,
            prefetch: 0,
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_force_path_style: None,
            s3_connect_timeout: Duration::from_secs(3),
            s3_operation_timeout: Duration::from_secs(60),
            s3_max_attempts: 3,
            output_prefix: "s3://retouch/outputs".into(),
            max_input_bytes: 50 << 20,
            max_input_pixels: 50_000_000,
            model: "hf:timbrooks/instruct-pix2pix".into(),
            model_variant: String::new(),
            model_cache_dir: PathBuf::from("/var/cache/retouch/models"),
            device: "cpu".into(),
            safety_checker: SafetyPolicy::Auto,
            max_batch: 4,
            max_batch_wait: Duration::from_millis(250),
            job_timeout: Duration::from_secs(600),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9464)),
            shutdown_timeout: Duration::from_secs(120),
            worker_name: String::new(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML or an environment value does not fit the schema (unknown key, wrong type).
    #[error("{origin}: {message}")]
    Invalid {
        /// The file or the environment.
        origin: String,
        /// serde's message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {message}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// What is allowed.
        message: String,
    },
}

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "RETOUCH_";

impl WorkerConfig {
    /// Every key, in documentation order (the environment variables are these, upper-cased,
    /// after `RETOUCH_`).
    pub fn keys() -> Vec<String> {
        match toml::Table::try_from(Self::default()) {
            Ok(table) => {
                let mut keys: Vec<String> = table.keys().cloned().collect();
                // `s3_force_path_style` has no default value, so it is absent from the table.
                keys.push("s3_force_path_style".into());
                keys
            }
            Err(_) => Vec::new(),
        }
    }

    /// Loads the config: defaults, then `file` (if any), then `RETOUCH_*` entries of `env`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or variable and the key.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid { origin: path.display().to_string(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        let known = Self::keys();
        let mut from_env = BTreeMap::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else { continue };
            let key = key.to_ascii_lowercase();
            if known.contains(&key) {
                from_env.insert(key, value);
            }
        }
        for (key, value) in &from_env {
            table.insert(key.clone(), env_value(value));
        }
        let config: Self = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let origin = match file {
                Some(p) if from_env.is_empty() => p.display().to_string(),
                Some(p) => format!("{} with RETOUCH_* overrides", p.display()),
                None => "RETOUCH_* environment".into(),
            };
            ConfigError::Invalid { origin, message: e.message().to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let range = |key: &'static str, ok: bool, message: &str| {
            if ok { Ok(()) } else { Err(ConfigError::OutOfRange { key, message: message.into() }) }
        };
        range("max_batch", (1..=64).contains(&self.max_batch), "must be 1–64")?;
        range("delivery_limit", self.delivery_limit >= 1, "must be at least 1")?;
        range(
            "prefetch",
            self.prefetch == 0 || usize::from(self.prefetch) >= self.max_batch,
            "must be 0 (auto) or ≥ max_batch",
        )?;
        range(
            "output_prefix",
            retouch_core::job::ObjectUrl::parse(&format!("{}/x", self.output_prefix.trim_end_matches('/'))).is_ok(),
            "must look like s3://bucket or s3://bucket/path",
        )?;
        range("s3_max_attempts", self.s3_max_attempts >= 1, "must be at least 1")?;
        range("job_timeout", !self.job_timeout.is_zero(), "must be positive")?;
        Ok(())
    }

    /// The prefetch actually used (resolving 0 = auto).
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch == 0 { (3 * self.max_batch).min(usize::from(u16::MAX)) as u16 } else { self.prefetch }
    }

    /// Path-style addressing actually used.
    pub fn effective_path_style(&self) -> bool {
        self.s3_force_path_style.unwrap_or(!self.s3_endpoint.is_empty())
    }

    /// The config as TOML with the AMQP password replaced by `***`, for the start-up log.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        copy.amqp_url = redact_url(&copy.amqp_url);
        toml::to_string(&copy).unwrap_or_else(|e| format!("(unprintable config: {e})"))
    }
}

/// An environment value as TOML: integers, floats and booleans typed, everything else a string.
fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else if let Ok(f) = raw.parse::<f64>()
        && raw.contains('.')
    {
        toml::Value::Float(f)
    } else {
        toml::Value::String(raw.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    #[test]
    fn runs_with_no_file_from_defaults_and_environment() {
        let c = WorkerConfig::load(
            None,
            env(&[
                ("RETOUCH_AMQP_URL", "amqp://u:secret@broker:5672/%2f"),
                ("RETOUCH_S3_ENDPOINT", "http://minio:9000"),
                ("RETOUCH_MODEL", "hf:timbrooks/instruct-pix2pix@fp16"),
                ("RETOUCH_METRICS_ADDR", "127.0.0.1:9999"),
                ("RETOUCH_OUTPUT_PREFIX", "s3://out/edits"),
                ("RETOUCH_MAX_BATCH", "2"),
                ("RETOUCH_DEVICE", "cuda:1"),
                ("RETOUCH_MAX_BATCH_WAIT", "1s"),
                ("RETOUCH_DECLARE_TOPOLOGY", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.max_batch, 2);
        assert_eq!(c.device, "cuda:1");
        assert_eq!(c.max_batch_wait, Duration::from_secs(1));
        assert_eq!(c.metrics_addr.port(), 9999);
        assert!(!c.declare_topology);
        assert!(c.effective_path_style());
        assert_eq!(c.effective_prefetch(), 6);
        assert!(!c.redacted().contains("secret"), "{}", c.redacted());
        assert!(c.redacted().contains("u:***@broker"));
    }

    #[test]
    fn every_key_is_overridable_and_the_example_file_is_complete() {
        let keys = WorkerConfig::keys();
        assert!(keys.len() >= 30, "{keys:?}");
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/worker.toml"))
            .expect("config/worker.toml exists");
        let table: toml::Table = example.parse().expect("example parses");
        for key in &keys {
            assert!(
                table.contains_key(key) || example.contains(&format!("# {key} =")),
                "config/worker.toml lacks {key}"
            );
        }
        WorkerConfig::load(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/worker.toml"))), env(&[]))
            .expect("the example config loads");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("retouch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("w.toml");
        std::fs::write(&path, "max_bach = 3\n").expect("write");
        let e = WorkerConfig::load(Some(&path), env(&[])).expect_err("typo").to_string();
        assert!(e.contains("max_bach"), "{e}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_MAX_BATCH", "lots")])).expect_err("type").to_string();
        assert!(e.contains("max_batch") || e.contains("invalid type"), "{e}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_MAX_BATCH", "0")])).expect_err("range").to_string();
        assert!(e.contains("max_batch"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
