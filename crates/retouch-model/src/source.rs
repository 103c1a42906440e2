//! Where a checkpoint comes from: a local diffusers directory, or `hf:OWNER/NAME[@REVISION]`
//! through the standard Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), shared with Python tools.
//!
//! Hub sources download only the files the pipeline reads (configs, tokenizer, the three
//! networks' weights — not the 7.7 GB original checkpoint), plus the safety checker's config,
//! weights and feature extractor only when the policy runs it (`auto` when `model_index.json`
//! names one, `on`, `block`; never with `off`). With
//! `HF_HUB_OFFLINE=1` nothing is downloaded and every file must already be in the cache, as
//! with `huggingface_hub`. `HF_TOKEN` (or the cache's `token` file) authenticates gated repos.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use retouch_core::safety::SafetyPolicy;

use crate::error::ModelError;

/// A checkpoint location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory in diffusers layout.
    Local(PathBuf),
    /// A Hub repository at a revision (branch, tag or commit; default `main`).
    Hub {
        /// `OWNER/NAME`.
        repo: String,
        /// Branch, tag or commit hash.
        revision: String,
    },
}

impl FromStr for ModelSource {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(rest) = s.strip_prefix("hf:") else {
            return Ok(Self::Local(PathBuf::from(s)));
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return Err(ModelError::Hub(format!("{s:?}: empty revision after '@'"))),
            None => (rest, "main"),
        };
        let valid_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((owner, name)) if valid_part(owner) && valid_part(name) => {
                Ok(Self::Hub { repo: repo.to_string(), revision: revision.to_string() })
            }
            _ => Err(ModelError::Hub(format!("{s:?}: expected hf:OWNER/NAME[@REVISION]"))),
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } if revision == "main" => write!(f, "hf:{repo}"),
            Self::Hub { repo, revision } => write!(f, "hf:{repo}@{revision}"),
        }
    }
}

/// Files every checkpoint must have.
const REQUIRED: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "vae/config.json",
];
/// Files read when present.
const OPTIONAL: &[&str] = &["tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"];
/// `(directory, weight file stems)` in preference order.
const WEIGHTS: &[(&str, &[&str])] = &[
    ("text_encoder", &["model", "pytorch_model"]),
    ("unet", &["diffusion_pytorch_model"]),
    ("vae", &["diffusion_pytorch_model"]),
];

/// Whether `HF_HUB_OFFLINE` is set to a true value.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The Hub cache directory, as `huggingface_hub` resolves it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    Cache::default().path().clone()
}

/// Fetches (or finds) one file of a Hub repository.
trait Fetch {
    fn fetch(&self, file: &str) -> Result<PathBuf, String>;
}

/// The cache alone (`HF_HUB_OFFLINE=1`).
struct CacheOnly {
    root: PathBuf,
    repo: Repo,
    revision: String,
}

impl Fetch for CacheOnly {
    fn fetch(&self, file: &str) -> Result<PathBuf, String> {
        if let Some(p) = Cache::new(self.root.clone()).repo(self.repo.clone()).get(file) {
            return Ok(p);
        }
        // A commit hash has no ref file: its snapshot directory is named after it.
        let snapshot = self.root.join(self.repo.folder_name()).join("snapshots").join(&self.revision).join(file);
        if snapshot.exists() {
            return Ok(snapshot);
        }
        Err(format!("{file} is not in the Hub cache at {} (HF_HUB_OFFLINE is set)", self.root.display()))
    }
}

/// The Hub API, which consults the cache first and downloads into it.
struct Online {
    repo: hf_hub::api::sync::ApiRepo,
}

impl Fetch for Online {
    fn fetch(&self, file: &str) -> Result<PathBuf, String> {
        self.repo.get(file).map_err(|e| format!("{file}: {e}"))
    }
}

impl ModelSource {
    /// A directory holding the checkpoint, downloading Hub files into the cache if needed.
    /// `variant` selects `*.<variant>.safetensors` weights; the safety checker's files come
    /// too when `safety` runs it.
    ///
    /// # Errors
    /// [`ModelError::MissingFile`] for a local directory without `model_index.json`;
    /// [`ModelError::Hub`] when a Hub file cannot be fetched or found in the cache.
    pub fn resolve(&self, variant: Option<&str>, safety: SafetyPolicy) -> Result<PathBuf, ModelError> {
        match self {
            Self::Local(dir) => {
                let index = dir.join("model_index.json");
                if index.is_file() { Ok(dir.clone()) } else { Err(ModelError::MissingFile(index)) }
            }
            Self::Hub { repo, revision } => {
                let hub_repo = Repo::with_revision(repo.clone(), RepoType::Model, revision.clone());
                let root = hub_cache_dir();
                if hub_offline() {
                    fetch_checkpoint(&CacheOnly { root, repo: hub_repo, revision: revision.clone() }, variant, safety)
                } else {
                    let token = std::env::var("HF_TOKEN").ok().or_else(|| Cache::new(root.clone()).token());
                    let api = ApiBuilder::from_cache(Cache::new(root))
                        .with_token(token)
                        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        .build()
                        .map_err(|e| ModelError::Hub(e.to_string()))?;
                    fetch_checkpoint(&Online { repo: api.repo(hub_repo) }, variant, safety).map_err(|e| match e {
                        ModelError::Hub(m) => ModelError::Hub(format!(
                            "{m} (cannot reach the Hub? set HF_HUB_OFFLINE=1 to use the local cache only, \
                             or give a local directory)"
                        )),
                        other => other,
                    })
                }
            }
        }
    }
}

/// The safety checker's files besides its weights.
const SAFETY_CHECKER_FILES: &[&str] = &["safety_checker/config.json", "feature_extractor/preprocessor_config.json"];

fn fetch_checkpoint(fetch: &dyn Fetch, variant: Option<&str>, safety: SafetyPolicy) -> Result<PathBuf, ModelError> {
    let index = fetch.fetch("model_index.json").map_err(ModelError::Hub)?;
    for file in REQUIRED.iter().skip(1) {
        fetch.fetch(file).map_err(ModelError::Hub)?;
    }
    for file in OPTIONAL {
        // Absent on some repositories; the tokenizer has defaults for them.
        let _ = fetch.fetch(file);
    }
    for (dir, stems) in WEIGHTS {
        fetch_weights(fetch, dir, stems, variant)?;
    }
    // An unusable model_index or policy is reported by the loader, with its own message.
    let has_checker = crate::config::read_json_object(&index)
        .and_then(|map| crate::safety::checkpoint_has_checker(&map))
        .unwrap_or(false);
    if safety.runs_checker(has_checker).unwrap_or(false) {
        for file in SAFETY_CHECKER_FILES {
            fetch.fetch(file).map_err(ModelError::Hub)?;
        }
        fetch_weights(fetch, "safety_checker", &["model", "pytorch_model"], variant)?;
    }
    Ok(index.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// Fetches one component's weights: single safetensors file, sharded safetensors, then `.bin`.
fn fetch_weights(fetch: &dyn Fetch, dir: &str, stems: &[&str], variant: Option<&str>) -> Result<(), ModelError> {
    let mut first_error = None;
    for ext in ["safetensors", "bin"] {
        for stem in stems {
            let name = match variant {
                Some(v) => format!("{dir}/{stem}.{v}.{ext}"),
                None => format!("{dir}/{stem}.{ext}"),
            };
            match fetch.fetch(&name) {
                Ok(_) => return Ok(()),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            if let Ok(index) = fetch.fetch(&format!("{name}.index.json")) {
                let map = crate::config::read_json_object(&index)?;
                let shards: std::collections::BTreeSet<&str> = map
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                for shard in shards {
                    fetch.fetch(&format!("{dir}/{shard}")).map_err(ModelError::Hub)?;
                }
                return Ok(());
            }
        }
    }
    Err(ModelError::Hub(first_error.unwrap_or_else(|| format!("no weights for {dir}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "hf:timbrooks/instruct-pix2pix".parse::<ModelSource>().expect("valid"),
            ModelSource::Hub { repo: "timbrooks/instruct-pix2pix".into(), revision: "main".into() }
        );
        assert_eq!(
            "hf:timbrooks/instruct-pix2pix@fp16".parse::<ModelSource>().expect("valid"),
            ModelSource::Hub { repo: "timbrooks/instruct-pix2pix".into(), revision: "fp16".into() }
        );
        assert_eq!("models/tiny".parse::<ModelSource>().expect("valid"), ModelSource::Local("models/tiny".into()));
        assert!("hf:nope".parse::<ModelSource>().is_err());
        assert!("hf:a/b@".parse::<ModelSource>().is_err());
        assert_eq!("hf:a/b@v2".parse::<ModelSource>().expect("valid").to_string(), "hf:a/b@v2");
    }

    /// A repository on disk that records which files were asked for.
    struct Recorder {
        root: PathBuf,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Fetch for Recorder {
        fn fetch(&self, file: &str) -> Result<PathBuf, String> {
            self.asked.borrow_mut().push(file.to_string());
            let path = self.root.join(file);
            if path.is_file() { Ok(path) } else { Err(format!("{file}: not in the repository")) }
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
    }

    fn asked(model: &str, policy: SafetyPolicy) -> Vec<String> {
        let recorder = Recorder { root: fixture(model), asked: Default::default() };
        fetch_checkpoint(&recorder, None, policy).expect("fetched");
        recorder.asked.into_inner()
    }

    #[test]
    fn the_safety_checker_is_downloaded_only_when_the_policy_runs_it() {
        let checker = |files: &[String]| {
            files.iter().filter(|f| f.starts_with("safety_checker/") || f.starts_with("feature_extractor/")).count()
        };
        // The checkpoint ships one (model_index.json names it, requires_safety_checker false).
        assert_eq!(checker(&asked("tiny-sd15-safety", SafetyPolicy::Auto)), 3);
        assert_eq!(checker(&asked("tiny-sd15-safety", SafetyPolicy::Block)), 3);
        assert_eq!(checker(&asked("tiny-sd15-safety", SafetyPolicy::Off)), 0);
        // None shipped: nothing to fetch, whatever the policy (loading reports `on`).
        assert_eq!(checker(&asked("tiny-sd15", SafetyPolicy::Auto)), 0);
        assert_eq!(checker(&asked("tiny-sd15", SafetyPolicy::On)), 0);
    }
}
