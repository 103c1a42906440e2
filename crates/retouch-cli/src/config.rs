//! The configuration of `retouch worker` (and of the campaign commands, which read its broker,
//! storage and output settings): one tree whose sections are the components' own settings,
//! deserialized straight into them, so each default and its documentation live once, beside
//! the code that uses it:
//!
//! | section | type | owner |
//! |---|---|---|
//! | `[amqp]` | [`AmqpSettings`] | the broker (`retouch-amqp`) |
//! | `[s3]` | [`S3Settings`] | the object store (`retouch-s3`) |
//! | `[engine]` | [`EngineSettings`] | the job engine (`retouch-worker`) |
//! | `[model]` | [`ModelSettings`] | the one model loader ([`crate::model`]) |
//! | `[metrics]` | [`MetricsSettings`] | the HTTP endpoint |
//! | `[webhooks]` | [`WebhookSettings`] | the webhook relay (`retouch-webhooks`) |
//!
//! Sources, later ones winning: the defaults, an optional TOML file (`--config`; the
//! documented example is `config/worker.toml`), then environment variables
//! `RETOUCH_<SECTION>_<KEY>` (`RETOUCH_AMQP_URL`, `RETOUCH_ENGINE_MAX_BATCH`,
//! `RETOUCH_MODEL_SOURCE`, …). Unknown keys in the file are errors; other `RETOUCH_*` variables
//! are ignored (tools share the prefix). The flat keys of releases before the sections
//! (`amqp_url`, `max_batch`, `model`, …, [`DEPRECATED_KEYS`]) are still read — at the top level
//! of the file and as `RETOUCH_<KEY>` — each with a warning naming its new key. S3 credentials
//! come from the standard AWS chain, never from here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use retouch_amqp::AmqpSettings;
use retouch_s3::S3Settings;
use retouch_webhooks::WebhookSettings;
use retouch_worker::engine::EngineSettings;
use serde::{Deserialize, Serialize};

use crate::model::ModelSettings;

/// Everything `retouch worker` can be told.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// The broker: URL, topology names, prefetch, reconnects.
    pub amqp: AmqpSettings,
    /// The object store: endpoint, region, addressing, timeouts.
    pub s3: S3Settings,
    /// The job engine: outputs, input limits, batching, deadlines, retries.
    pub engine: EngineSettings,
    /// The model: source, device, precision, kernels, safety checker.
    pub model: ModelSettings,
    /// The operations endpoint.
    pub metrics: MetricsSettings,
    /// Webhooks: the signing secret, the hosts that may be called, retries.
    pub webhooks: WebhookSettings,
}

/// `[metrics]`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Listen address.
    pub addr: SocketAddr,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { addr: SocketAddr::from(([0, 0, 0, 0], 9464)) }
    }
}

/// The sections, in file order.
const SECTIONS: [&str; 6] = ["amqp", "s3", "engine", "model", "metrics", "webhooks"];

/// Keys with no default value (absent from the serialized defaults) that a section accepts.
const OPTIONAL_KEYS: [(&str, &str); 1] = [("s3", "force_path_style")];

/// The flat keys of configurations before sections: `(old key, section, key)`.
pub const DEPRECATED_KEYS: [(&str, &str, &str); 31] = [
    ("amqp_url", "amqp", "url"),
    ("jobs_exchange", "amqp", "jobs_exchange"),
    ("jobs_queue", "amqp", "jobs_queue"),
    ("results_exchange", "amqp", "results_exchange"),
    ("dead_letter_exchange", "amqp", "dead_letter_exchange"),
    ("dead_letter_queue", "amqp", "dead_letter_queue"),
    ("declare_topology", "amqp", "declare_topology"),
    ("delivery_limit", "amqp", "delivery_limit"),
    ("prefetch", "amqp", "prefetch"),
    ("retry_backoff", "engine", "retry_backoff"),
    ("retry_backoff_max", "engine", "retry_backoff_max"),
    ("s3_endpoint", "s3", "endpoint"),
    ("s3_region", "s3", "region"),
    ("s3_force_path_style", "s3", "force_path_style"),
    ("s3_connect_timeout", "s3", "connect_timeout"),
    ("s3_operation_timeout", "s3", "operation_timeout"),
    ("s3_max_attempts", "s3", "max_attempts"),
    ("output_prefix", "engine", "output_prefix"),
    ("max_input_bytes", "engine", "max_input_bytes"),
    ("max_input_pixels", "engine", "max_input_pixels"),
    ("max_batch", "engine", "max_batch"),
    ("max_batch_wait", "engine", "max_batch_wait"),
    ("job_timeout", "engine", "job_timeout"),
    ("shutdown_timeout", "engine", "shutdown_timeout"),
    ("worker_name", "engine", "worker_name"),
    ("model", "model", "source"),
    ("model_variant", "model", "variant"),
    ("model_cache_dir", "model", "cache_dir"),
    ("device", "model", "device"),
    ("safety_checker", "model", "safety_checker"),
    ("metrics_addr", "metrics", "addr"),
];

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
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{section}.{message}")]
    OutOfRange {
        /// The section.
        section: &'static str,
        /// The key and what is allowed.
        message: String,
    },
}

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "RETOUCH_";

/// A loaded configuration and what was noticed on the way.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: WorkerConfig,
    /// Deprecated keys or variables that were used, each with its replacement.
    pub warnings: Vec<String>,
}

impl WorkerConfig {
    /// Every `section.key`, in documentation order (the environment variable of `s.k` is
    /// `RETOUCH_S_K`, upper case).
    pub fn keys() -> Vec<(&'static str, String)> {
        let defaults = defaults_table();
        let mut keys = Vec::new();
        for section in SECTIONS {
            if let Some(toml::Value::Table(table)) = defaults.get(section) {
                keys.extend(table.keys().map(|k| (section, k.clone())));
            }
            keys.extend(OPTIONAL_KEYS.iter().filter(|(s, _)| *s == section).map(|(s, k)| (*s, (*k).to_string())));
        }
        keys
    }

    /// Loads the config: defaults, then `file` (if any), then the `RETOUCH_*` entries of `env`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or variable and the key.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Loaded, ConfigError> {
        let mut warnings = Vec::new();
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                let mut table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid { origin: path.display().to_string(), message: e.to_string() })?;
                upgrade_flat_keys(&mut table, path, &mut warnings)?;
                table
            }
            None => toml::Table::new(),
        };

        let defaults = defaults_table();
        let known = Self::keys();
        // Deprecated names first, so that the sectioned name wins when both are set.
        let (mut current, mut deprecated) = (BTreeMap::new(), BTreeMap::new());
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let rest = rest.to_ascii_lowercase();
            if let Some((section, key)) = known.iter().find(|(s, k)| rest == format!("{s}_{k}")) {
                current.insert((*section, key.clone()), (name, value));
            } else if let Some((_, section, key)) = DEPRECATED_KEYS.iter().find(|(old, _, _)| rest == *old) {
                warnings.push(format!(
                    "{name} is deprecated: use {ENV_PREFIX}{}_{} ([{section}] {key})",
                    section.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                ));
                deprecated.insert((*section, (*key).to_string()), (name, value));
            }
        }
        let from_env = !current.is_empty() || !deprecated.is_empty();
        for ((section, key), (_, value)) in deprecated.into_iter().chain(current) {
            let typed = env_value(&value, defaults.get(section).and_then(|t| t.get(&key)));
            section_table(&mut table, section).insert(key, typed);
        }

        let config: Self = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let origin = match file {
                Some(p) if from_env => format!("{} with RETOUCH_* overrides", p.display()),
                Some(p) => p.display().to_string(),
                None => "RETOUCH_* environment".into(),
            };
            // Display names the key (`in `engine.max_batch``); message() alone does not.
            ConfigError::Invalid { origin, message: e.to_string().trim().replace('\n', " ") }
        })?;
        config.validate()?;
        Ok(Loaded { config, warnings })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let range = |section: &'static str| move |message: String| ConfigError::OutOfRange { section, message };
        self.amqp.validate().map_err(range("amqp"))?;
        self.s3.validate().map_err(range("s3"))?;
        self.engine.validate().map_err(range("engine"))?;
        self.model.validate().map_err(range("model"))?;
        self.webhooks.validate().map_err(range("webhooks"))?;
        if self.amqp.prefetch != 0 && usize::from(self.amqp.prefetch) < self.engine.max_batch {
            return Err(range("amqp")(format!(
                "prefetch {}: must be 0 (auto) or ≥ engine.max_batch ({})",
                self.amqp.prefetch, self.engine.max_batch
            )));
        }
        Ok(())
    }

    /// The broker prefetch as used: `[amqp] prefetch`, or 3 × `[engine] max_batch` when 0.
    pub fn effective_prefetch(&self) -> u16 {
        let auto = u16::try_from(3 * self.engine.max_batch).unwrap_or(u16::MAX);
        self.amqp.prefetch_or(auto)
    }

    /// The broker settings as a component named `name` uses them: the prefetch resolved and
    /// the connection named `<connection_name> <name>`.
    pub fn amqp_for(&self, name: &str) -> AmqpSettings {
        AmqpSettings {
            prefetch: self.effective_prefetch(),
            connection_name: format!("{} {name}", self.amqp.connection_name),
            ..self.amqp.clone()
        }
    }

    /// The config as TOML with the AMQP password replaced by `***`, for the start-up log.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        copy.amqp.url = copy.amqp.redacted_url();
        copy.webhooks = copy.webhooks.redacted();
        toml::to_string(&copy).unwrap_or_else(|e| format!("(unprintable config: {e})"))
    }
}

/// The defaults as TOML tables, one per section.
fn defaults_table() -> toml::Table {
    toml::Table::try_from(WorkerConfig::default()).unwrap_or_default()
}

/// `table[section]`, created when missing (a non-table value there is replaced: serde will
/// then report the key, not this).
fn section_table<'t>(table: &'t mut toml::Table, section: &str) -> &'t mut toml::Table {
    let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    entry.as_table_mut().expect("made a table above")
}

/// Moves deprecated top-level keys of a file into their sections, with a warning each; a key
/// set both ways is an error (which one was meant is unclear).
fn upgrade_flat_keys(table: &mut toml::Table, path: &Path, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    for (old, section, key) in DEPRECATED_KEYS {
        // `model` is both an old key (a string) and a section (a table).
        if table.get(old).is_none_or(toml::Value::is_table) {
            continue;
        }
        let Some(value) = table.remove(old) else { continue };
        let target = section_table(table, section);
        if target.contains_key(key) {
            return Err(ConfigError::Invalid {
                origin: path.display().to_string(),
                message: format!(
                    "both the deprecated key `{old}` and `{section}.{key}` are set; keep `{section}.{key}`"
                ),
            });
        }
        // The old worker also used the operation timeout for each attempt.
        if old == "s3_operation_timeout" && !target.contains_key("attempt_timeout") {
            target.insert("attempt_timeout".to_string(), value.clone());
        }
        target.insert(key.to_string(), value);
        warnings.push(format!("{}: `{old}` is deprecated: use `{key}` in [{section}]", path.display()));
    }
    Ok(())
}

/// An environment value typed like the key's default: integers and booleans parsed where the
/// default is one, strings kept as strings; keys without a default (optional ones) are typed
/// by their look.
fn env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    let string = || toml::Value::String(raw.to_string());
    match default {
        Some(toml::Value::String(_)) => string(),
        Some(toml::Value::Integer(_)) => raw.parse().map_or_else(|_| string(), toml::Value::Integer),
        Some(toml::Value::Boolean(_)) => raw.parse().map_or_else(|_| string(), toml::Value::Boolean),
        Some(toml::Value::Float(_)) => raw.parse().map_or_else(|_| string(), toml::Value::Float),
        // Lists (`webhooks.allow_hosts`): comma-separated.
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into())).collect(),
        ),
        _ => {
            if let Ok(b) = raw.parse::<bool>() {
                toml::Value::Boolean(b)
            } else if let Ok(i) = raw.parse::<i64>() {
                toml::Value::Integer(i)
            } else {
                string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/worker.toml")
    }

    #[test]
    fn webhooks_come_from_the_environment_with_the_secret_redacted() {
        let loaded = WorkerConfig::load(
            None,
            env(&[
                ("RETOUCH_WEBHOOKS_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                ("RETOUCH_WEBHOOKS_ALLOW_HOSTS", "hooks.example.com, *.internal.example.com:8443"),
                ("RETOUCH_WEBHOOKS_RETRY_FOR", "10m"),
                ("RETOUCH_AMQP_CANCEL_RETENTION", "2h"),
            ]),
        )
        .expect("valid");
        let c = loaded.config;
        assert!(c.webhooks.enabled());
        assert_eq!(c.webhooks.allow_hosts, ["hooks.example.com", "*.internal.example.com:8443"]);
        assert_eq!(c.webhooks.retry_for, Duration::from_secs(600));
        assert_eq!(c.amqp.cancel_retention, Duration::from_secs(7200));
        let shown = c.redacted();
        assert!(!shown.contains("MfKQ9r8") && shown.contains("[webhooks]"), "{shown}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_WEBHOOKS_ALLOW_HOSTS", "https://x.example.com/path")]))
            .expect_err("a URL is not a host");
        assert!(e.to_string().contains("webhooks.allow_hosts"), "{e}");
    }

    #[test]
    fn runs_with_no_file_from_defaults_and_sectioned_environment() {
        let loaded = WorkerConfig::load(
            None,
            env(&[
                ("RETOUCH_AMQP_URL", "amqp://u:secret@broker:5672/%2f"),
                ("RETOUCH_S3_ENDPOINT", "http://minio:9000"),
                ("RETOUCH_MODEL_SOURCE", "hf:timbrooks/instruct-pix2pix@fp16"),
                ("RETOUCH_METRICS_ADDR", "127.0.0.1:9999"),
                ("RETOUCH_ENGINE_OUTPUT_PREFIX", "s3://out/edits"),
                ("RETOUCH_ENGINE_MAX_BATCH", "2"),
                ("RETOUCH_ENGINE_WORKER_NAME", "42"),
                ("RETOUCH_MODEL_DEVICE", "cuda:1"),
                ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "1s"),
                ("RETOUCH_AMQP_DECLARE_TOPOLOGY", "false"),
                ("RETOUCH_CACHE", "/elsewhere"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = loaded.config;
        assert_eq!((c.engine.max_batch, c.model.device.as_str()), (2, "cuda:1"));
        assert_eq!(c.engine.worker_name, "42", "a string key stays a string even when it looks like a number");
        assert_eq!(c.engine.max_batch_wait, Duration::from_secs(1));
        assert_eq!(c.metrics.addr.port(), 9999);
        assert!(!c.amqp.declare_topology);
        assert!(c.s3.path_style());
        assert_eq!(c.effective_prefetch(), 6);
        assert_eq!(c.amqp_for("w1").connection_name, "retouch w1");
        assert!(!c.redacted().contains(":secret@"), "{}", c.redacted());
        assert!(c.redacted().contains("u:***@broker"));
    }

    #[test]
    fn the_example_file_holds_every_key_with_its_default() {
        let text = std::fs::read_to_string(example()).expect("config/worker.toml exists");
        let table: toml::Table = text.parse().expect("example parses");
        for (section, key) in WorkerConfig::keys() {
            let in_section = table.get(section).and_then(|s| s.get(&key)).is_some();
            assert!(in_section || text.contains(&format!("# {key} =")), "config/worker.toml lacks {section}.{key}");
        }
        let loaded = WorkerConfig::load(Some(&example()), env(&[])).expect("the example config loads");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.config, WorkerConfig::default(), "the example shows the built-in defaults");
    }

    #[test]
    fn flat_keys_still_work_with_a_warning_and_lose_to_sectioned_ones() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("old.toml");
        std::fs::write(
            &path,
            "max_batch = 2\nmodel = \"/models/x\"\nmetrics_addr = \"127.0.0.1:1\"\ns3_operation_timeout = \"5m\"\n",
        )
        .expect("write");
        let loaded = WorkerConfig::load(
            Some(&path),
            env(&[
                ("RETOUCH_DEVICE", "cuda"),
                ("RETOUCH_MAX_BATCH_WAIT", "2s"),
                ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "3s"),
            ]),
        )
        .expect("valid");
        let c = &loaded.config;
        assert_eq!((c.engine.max_batch, c.model.source.as_str(), c.metrics.addr.port()), (2, "/models/x", 1));
        assert_eq!(c.model.device, "cuda");
        let five_minutes = Duration::from_secs(300);
        assert_eq!((c.s3.operation_timeout, c.s3.attempt_timeout), (five_minutes, five_minutes), "as the old worker");
        assert_eq!(c.engine.max_batch_wait, Duration::from_secs(3), "the sectioned variable wins");
        let warnings = loaded.warnings.join("\n");
        for needle in [
            "`max_batch` is deprecated",
            "`model` is deprecated: use `source` in [model]",
            "RETOUCH_DEVICE is deprecated: use RETOUCH_MODEL_DEVICE",
        ] {
            assert!(warnings.contains(needle), "{needle}: {warnings}");
        }
        std::fs::write(&path, "max_batch = 2\n[engine]\nmax_batch = 3\n").expect("write");
        let e = WorkerConfig::load(Some(&path), env(&[])).expect_err("both").to_string();
        assert!(e.contains("both the deprecated key `max_batch` and `engine.max_batch`"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "[engine]\nmax_bach = 3\n").expect("write");
        let e = WorkerConfig::load(Some(&path), env(&[])).expect_err("typo").to_string();
        assert!(e.contains("max_bach"), "{e}");
        std::fs::write(&path, "[engin]\nmax_batch = 3\n").expect("write");
        let e = WorkerConfig::load(Some(&path), env(&[])).expect_err("section typo").to_string();
        assert!(e.contains("engin"), "{e}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_ENGINE_MAX_BATCH", "lots")])).expect_err("type").to_string();
        assert!(
            e.contains("RETOUCH_* environment") && e.contains("invalid type") && e.contains("engine.max_batch"),
            "{e}"
        );
        let e = WorkerConfig::load(None, env(&[("RETOUCH_ENGINE_MAX_BATCH", "0")])).expect_err("range").to_string();
        assert!(e.contains("engine.max_batch"), "{e}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_AMQP_PREFETCH", "2"), ("RETOUCH_ENGINE_MAX_BATCH", "4")]))
            .expect_err("prefetch below the batch")
            .to_string();
        assert!(e.contains("amqp.prefetch 2"), "{e}");
        let e = WorkerConfig::load(None, env(&[("RETOUCH_MODEL_DEVICE", "tpu")])).expect_err("device").to_string();
        assert!(e.contains("model.") && e.contains("tpu"), "{e}");
    }
}

#[cfg(test)]
mod properties {
    //! Configuration files and environment overrides from arbitrary input: a configuration or a
    //! [`ConfigError`], never a panic.

    use proptest::prelude::*;

    use super::*;

    /// A `RETOUCH_*` variable: a real key (or a deprecated one) with an arbitrary value.
    fn variable() -> impl Strategy<Value = (String, String)> {
        let keys: Vec<String> = WorkerConfig::keys()
            .into_iter()
            .map(|(s, k)| format!("{ENV_PREFIX}{}_{}", s.to_ascii_uppercase(), k.to_ascii_uppercase()))
            .chain(DEPRECATED_KEYS.iter().map(|(old, _, _)| format!("{ENV_PREFIX}{}", old.to_ascii_uppercase())))
            .collect();
        let value = prop_oneof![".{0,30}", "[0-9]{1,6}", "[0-9]{1,3}(ms|s|m|h)", Just("true".to_string())];
        (prop::sample::select(keys), value)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_environment_overrides_load_or_fail_typed(vars in prop::collection::vec(variable(), 0..8)) {
            if let Ok(loaded) = WorkerConfig::load(None, vars) {
                // What loads is valid, and shows no secret.
                prop_assert!(loaded.config.validate().is_ok());
                let _ = loaded.config.redacted();
            }
        }

        #[test]
        fn arbitrary_config_files_load_or_fail_typed(text in prop_oneof![
            ".{0,200}",
            "\\[(amqp|s3|engine|model|metrics|webhooks)\\]\n[a-z_]{1,20} = (\"[a-z0-9:/.]{0,20}\"|[0-9]{1,4}|true|\\[\\])\n",
        ]) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("worker.toml");
            std::fs::write(&path, &text).expect("write");
            let _ = WorkerConfig::load(Some(&path), std::iter::empty());
        }
    }
}
