//! The protocol's error kinds and the job error every stage reports, with its retry class.

use serde::{Deserialize, Serialize};

/// `error.kind` of a failed result. A closed set: consumers switch on it, metrics label by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The job is malformed (not JSON, missing or unknown keys, bad values).
    InvalidJob,
    /// The source object does not exist.
    SourceNotFound,
    /// The source is not a decodable image (or too small to edit).
    InvalidImage,
    /// The source exceeds the size limits.
    ImageTooLarge,
    /// Object storage failed (5xx, timeouts, access denied).
    Storage,
    /// The model failed.
    Model,
    /// The job ran past its deadline.
    Timeout,
    /// The safety checker flagged the edited image and the worker's policy is `block`: no
    /// output was written.
    Nsfw,
    /// Anything else (a bug or a broker failure).
    Internal,
}

impl ErrorKind {
    /// Every kind, for pre-initialised metric labels.
    pub const ALL: [ErrorKind; 9] = [
        Self::InvalidJob,
        Self::SourceNotFound,
        Self::InvalidImage,
        Self::ImageTooLarge,
        Self::Storage,
        Self::Model,
        Self::Timeout,
        Self::Nsfw,
        Self::Internal,
    ];

    /// The protocol / label name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJob => "invalid_job",
            Self::SourceNotFound => "source_not_found",
            Self::InvalidImage => "invalid_image",
            Self::ImageTooLarge => "image_too_large",
            Self::Storage => "storage",
            Self::Model => "model",
            Self::Timeout => "timeout",
            Self::Nsfw => "nsfw",
            Self::Internal => "internal",
        }
    }

    /// Parses a protocol name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's failure at some stage.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct JobError {
    /// Protocol classification.
    pub kind: ErrorKind,
    /// Human-readable cause, safe to publish.
    pub message: String,
    /// A later attempt may succeed (storage 5xx, timeouts, broker trouble, model OOM).
    pub retryable: bool,
}

impl JobError {
    /// A permanent error (`retryable = false`).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retryable: false }
    }

    /// A transient error (`retryable = true`).
    pub fn transient(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retryable: true }
    }
}
