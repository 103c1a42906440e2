//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the checkpoint could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file the checkpoint layout requires is absent.
    #[error("the checkpoint has no {0}")]
    MissingFile(PathBuf),
    /// A config file is not valid JSON or has the wrong shape.
    #[error("invalid config {path}: {message}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A config key is set to something this implementation does not support; building the
    /// network anyway would silently give a different model.
    #[error("unsupported {component} config: `{key}`: {message}")]
    UnsupportedConfig {
        /// `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` or `model_index`.
        component: &'static str,
        /// The offending key.
        key: String,
        /// Why it is rejected.
        message: String,
    },
    /// The weights do not fit the config (missing, misshapen or unused tensors).
    #[error("{component} weights: {message}")]
    Weights {
        /// The component whose weights are wrong.
        component: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer files could not be turned into a tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model could not be fetched from the Hugging Face Hub (or its cache).
    #[error("hub: {0}")]
    Hub(String),
    /// The requested device is unavailable or unsupported by this build.
    #[error("device: {0}")]
    Device(String),
    /// The safety-checker policy cannot be honoured with this checkpoint (`on`/`block` without
    /// a checker).
    #[error("safety checker: {0}")]
    SafetyChecker(String),
    /// An input to an edit is invalid (size, steps, latents shape…).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The edit was cancelled by its caller.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed while running the model.
    #[error("compute: {0}")]
    Compute(#[from] candle_core::Error),
}

impl ModelError {
    /// Whether the failure is about the input (the same request will fail again) rather than
    /// the model or the machine.
    pub fn is_input_error(&self) -> bool {
        matches!(self, Self::InvalidInput(_))
    }
}
