//! The object-storage seam: where inputs come from and outputs go (S3 in the fleet, the local
//! filesystem in `retouch batch`).

use std::collections::BTreeMap;
use std::future::Future;

use crate::job::ObjectUrl;

/// What a `HEAD` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// Entity tag, when the store gives one.
    pub etag: Option<String>,
    /// User metadata (`x-amz-meta-*` without the prefix, lower-case keys).
    pub metadata: BTreeMap<String, String>,
}

/// Why a storage call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The object (or bucket) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The object is larger than the caller accepts.
    #[error("object of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Credentials are wrong or lack permission (403): retrying will not help.
    #[error("access denied: {0}")]
    Denied(String),
    /// A failure that may pass (5xx, throttling, timeouts, connection errors).
    #[error("transient storage failure: {0}")]
    Transient(String),
    /// The location is not one this store serves (wrong scheme, bad key).
    #[error("invalid location: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// An object store. Implementations are cheap to share (`&self` everywhere).
pub trait ObjectStore: Send + Sync + 'static {
    /// Reads a whole object, refusing objects over `max_bytes` before downloading them.
    fn get(&self, url: &ObjectUrl, max_bytes: u64) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;

    /// The object's metadata, `None` if it does not exist.
    fn head(&self, url: &ObjectUrl) -> impl Future<Output = Result<Option<ObjectMeta>, StoreError>> + Send;

    /// Writes a whole object with its content type and user metadata (replacing any).
    fn put(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
