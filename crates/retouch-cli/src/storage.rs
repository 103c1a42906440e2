//! One object store for the CLI's own records (campaign ledgers): `s3://` through S3,
//! `file://` through the local filesystem.

use std::collections::BTreeMap;

use retouch_core::job::ObjectUrl;
use retouch_core::store::{ObjectMeta, ObjectStore, StoreError};
use retouch_s3::S3Store;
use retouch_worker::local::FsStore;

/// Dispatches on the URL scheme.
#[derive(Clone, Debug)]
pub struct Storage {
    /// S3, when configured.
    pub s3: Option<S3Store>,
}

impl Storage {
    fn s3(&self, url: &ObjectUrl) -> Result<&S3Store, StoreError> {
        self.s3.as_ref().ok_or_else(|| StoreError::Invalid(format!("{url}: no S3 settings")))
    }
}

impl ObjectStore for Storage {
    async fn get(&self, url: &ObjectUrl, max_bytes: u64) -> Result<Vec<u8>, StoreError> {
        match url.scheme.as_str() {
            "file" => FsStore.get(url, max_bytes).await,
            _ => self.s3(url)?.get(url, max_bytes).await,
        }
    }

    async fn head(&self, url: &ObjectUrl) -> Result<Option<ObjectMeta>, StoreError> {
        match url.scheme.as_str() {
            "file" => FsStore.head(url).await,
            _ => self.s3(url)?.head(url).await,
        }
    }

    async fn put(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        match url.scheme.as_str() {
            "file" => FsStore.put(url, body, content_type, metadata).await,
            _ => self.s3(url)?.put(url, body, content_type, metadata).await,
        }
    }
}
