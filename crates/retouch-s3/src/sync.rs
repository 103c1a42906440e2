//! Prefix mirroring: [`S3Store::sync_prefix`] copies every object under `s3://bucket/prefix/`
//! into `cache_root/<bucket>/<prefix>/`, so a cluster without Hub access loads its model from
//! its own bucket.
//!
//! * The listing is [`crate::listing`]'s ListObjectsV2 walk (all pages, directory markers
//!   skipped).
//! * A manifest ([`MANIFEST_FILE`], JSON, key → size + ETag + last-modified) in the target
//!   directory records what was mirrored; an object whose listing matches its entry (same size,
//!   and same ETag, or same last-modified when the store lists no ETags, as s3s-fs) and whose
//!   local file still has that size is skipped.
//! * Each file is downloaded to a temporary file in its own directory, checked (size; MD5 when
//!   the ETag is a plain MD5: no `-` and no KMS/customer-key encryption), flushed to disk and
//!   renamed over the target, so readers see either the old or the new file, never a partial
//!   one. The manifest is rewritten (also atomically) after every file: an interrupted sync
//!   resumes where it stopped.
//! * At most [`MAX_PARALLEL_DOWNLOADS`] downloads run at once; the coordinating task alone owns
//!   the manifest. The first failure aborts the others (their temporary files are removed).
//! * Local files whose objects vanished are left alone. Two processes syncing the same
//!   directory at once do not corrupt files (renames are atomic) but may download twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::types::ServerSideEncryption;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{S3Error, classify};
use crate::listing::{list_objects, parse_prefix, safe_components};
use crate::store::S3Store;

/// Name of the manifest kept in the target directory of a sync.
pub const MANIFEST_FILE: &str = ".retouch-sync.json";

/// Downloads in flight at once: enough to hide per-request latency on many small files (configs,
/// tokenizer) without splitting the bandwidth of the few large ones (weights) too thinly.
pub const MAX_PARALLEL_DOWNLOADS: usize = 4;

const MANIFEST_VERSION: u32 = 1;

/// What a sync did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReport {
    /// The local mirror of the prefix (`cache_root/<bucket>/<prefix>`).
    pub dir: PathBuf,
    /// Objects listed under the prefix (directory markers excluded).
    pub listed: usize,
    /// Objects downloaded by this sync.
    pub downloaded: usize,
    /// Objects whose local copy was already current.
    pub skipped: usize,
    /// Bytes downloaded by this sync.
    pub bytes_downloaded: u64,
}

/// What the manifest remembers of one mirrored object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    etag: Option<String>,
    /// `seconds.nanoseconds` of the listing's `LastModified`.
    last_modified: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// Object key (full, with the prefix) → entry.
    objects: BTreeMap<String, Entry>,
}

impl Manifest {
    /// The manifest at `path`; an absent, unreadable or foreign one counts as empty (everything
    /// is downloaded again, which is always safe).
    async fn load(path: &Path) -> Self {
        let parsed = match tokio::fs::read(path).await {
            Ok(bytes) => serde_json::from_slice::<Self>(&bytes).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(manifest) if manifest.version == MANIFEST_VERSION => manifest,
            Ok(manifest) => {
                tracing::warn!(path = %path.display(), version = manifest.version, "unknown sync manifest version: re-downloading");
                Self::default()
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "unreadable sync manifest: re-downloading");
                Self::default()
            }
        }
    }

    /// Writes the manifest atomically (temporary file + rename).
    async fn save(&self, path: &Path) -> Result<(), S3Error> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| S3Error::io("encode", path, e.into()))?;
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(&tmp, json).await.map_err(|e| S3Error::io("write", &tmp, e))?;
        tokio::fs::rename(&tmp, path).await.map_err(|e| S3Error::io("rename", &tmp, e))
    }
}

/// One listed object to consider.
#[derive(Debug)]
struct Listed {
    key: String,
    local: PathBuf,
    entry: Entry,
}

impl Listed {
    /// Whether the manifest's entry still describes the listed object.
    fn matches(&self, recorded: &Entry) -> bool {
        recorded.size == self.entry.size
            && match &self.entry.etag {
                Some(etag) => recorded.etag.as_ref() == Some(etag),
                None => self.entry.last_modified.is_some() && recorded.last_modified == self.entry.last_modified,
            }
    }
}

fn timestamp(t: &DateTime) -> String {
    format!("{}.{:09}", t.secs(), t.subsec_nanos())
}

/// A duration for log fields, in milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A temporary file removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover `.part` file (unique name, never read) wastes space only.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.{}-{n}.part", std::process::id()))
}

/// The lower-case hex MD5 an ETag stands for, when it is one: 32 hex digits (multipart ETags end
/// in `-<parts>`).
fn plain_md5(etag: &str) -> Option<String> {
    let bare = etag.trim_start_matches("W/").trim_matches('"');
    (bare.len() == 32 && bare.bytes().all(|b| b.is_ascii_hexdigit())).then(|| bare.to_ascii_lowercase())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A finished download: the manifest entry to record.
struct Done {
    key: String,
    entry: Entry,
}

/// Downloads `bucket/key` to `local` through a temporary file; `stall` bounds the wait for each
/// chunk of the body.
async fn download(client: Client, bucket: String, listed: Listed, stall: Duration) -> Result<Done, S3Error> {
    let started = Instant::now();
    let Listed { key, local, mut entry } = listed;
    let what = format!("GetObject s3://{bucket}/{key}");
    let output = client.get_object().bucket(&bucket).key(&key).send().await.map_err(|e| classify(&what, &e))?;
    let integrity = |message: String| S3Error::Integrity { bucket: bucket.clone(), key: key.clone(), message };

    if let Some(parent) = local.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|e| S3Error::io("create directory", parent, e))?;
    }
    let mut temp = TempFile { path: temp_path(&local), armed: true };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp.path)
        .await
        .map_err(|e| S3Error::io("create", &temp.path, e))?;

    let mut body = output.body;
    let mut hasher = Md5::new();
    let mut written: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => {
                return Err(S3Error::Store(retouch_core::store::StoreError::Transient(format!(
                    "{what}: no data for {stall:?} after {written} bytes"
                ))));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(S3Error::Store(retouch_core::store::StoreError::Transient(format!(
                    "{what}: reading the body failed after {written} bytes: {e}"
                ))));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        hasher.update(&chunk);
        written += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|e| S3Error::io("write", &temp.path, e))?;
    }
    file.flush().await.map_err(|e| S3Error::io("write", &temp.path, e))?;
    file.sync_all().await.map_err(|e| S3Error::io("sync", &temp.path, e))?;
    drop(file);

    let expected = output.content_length.and_then(|n| u64::try_from(n).ok()).unwrap_or(entry.size);
    if written != expected {
        return Err(integrity(format!("received {written} bytes, expected {expected}")));
    }
    let kms_or_customer_key =
        matches!(output.server_side_encryption, Some(ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse))
            || output.sse_customer_algorithm.is_some();
    if let Some(md5) = output.e_tag.as_deref().and_then(plain_md5)
        && !kms_or_customer_key
    {
        let actual = hex(&hasher.finalize());
        if actual != md5 {
            return Err(integrity(format!("MD5 of the bytes is {actual}, the ETag says {md5}")));
        }
    }

    tokio::fs::rename(&temp.path, &local).await.map_err(|e| S3Error::io("rename", &temp.path, e))?;
    temp.armed = false;
    entry.size = written;
    if entry.etag.is_none() {
        entry.etag = output.e_tag;
    }
    tracing::info!(
        key = %key,
        path = %local.display(),
        bytes = written,
        elapsed_ms = millis(started.elapsed()),
        "downloaded"
    );
    Ok(Done { key, entry })
}

impl S3Store {
    /// Mirrors every object under `url_prefix` (`s3://bucket/prefix/`; `s3://bucket` for the
    /// whole bucket) into `cache_root/<bucket>/<prefix>/` and returns that directory. See the
    /// [module documentation](crate::sync) for what is skipped and how files are replaced.
    ///
    /// # Errors
    /// [`S3Error::Invalid`] for a malformed prefix or a key that cannot be a relative path
    /// (`..`, `//`); [`S3Error::Store`] when listing or a download fails; [`S3Error::Integrity`]
    /// when a download does not match its size or MD5; [`S3Error::Io`] for local files.
    pub async fn sync_prefix(&self, url_prefix: &str, cache_root: &Path) -> Result<PathBuf, S3Error> {
        Ok(self.sync_prefix_report(url_prefix, cache_root).await?.dir)
    }

    /// [`sync_prefix`](Self::sync_prefix), returning what was done.
    ///
    /// # Errors
    /// As [`sync_prefix`](Self::sync_prefix).
    pub async fn sync_prefix_report(&self, url_prefix: &str, cache_root: &Path) -> Result<SyncReport, S3Error> {
        let started = Instant::now();
        let (bucket, prefix) = parse_prefix(url_prefix)?;
        let mut dir = cache_root.join(&bucket);
        dir.extend(prefix.split('/').filter(|p| !p.is_empty()));
        tokio::fs::create_dir_all(&dir).await.map_err(|e| S3Error::io("create directory", &dir, e))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let mut manifest = Manifest::load(&manifest_path).await;
        manifest.version = MANIFEST_VERSION;

        let listed = self.list(&bucket, &prefix, &dir).await?;
        let mut report =
            SyncReport { dir: dir.clone(), listed: listed.len(), downloaded: 0, skipped: 0, bytes_downloaded: 0 };
        let mut todo = Vec::new();
        for object in listed {
            let current = match manifest.objects.get(&object.key) {
                Some(recorded) if object.matches(recorded) => {
                    tokio::fs::metadata(&object.local).await.is_ok_and(|m| m.is_file() && m.len() == object.entry.size)
                }
                _ => false,
            };
            if current {
                tracing::debug!(key = %object.key, "up to date");
                report.skipped += 1;
            } else {
                todo.push(object);
            }
        }

        let stall = self.settings.attempt_timeout;
        let mut pending = todo.into_iter();
        // Dropping the set (on the first error) aborts the downloads still running.
        let mut running = JoinSet::new();
        loop {
            while running.len() < MAX_PARALLEL_DOWNLOADS {
                let Some(object) = pending.next() else { break };
                running.spawn(download(self.client.clone(), bucket.clone(), object, stall));
            }
            let Some(joined) = running.join_next().await else { break };
            let done = match joined {
                Ok(result) => result?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => return Err(S3Error::Invalid(format!("download task cancelled: {e}"))),
            };
            report.downloaded += 1;
            report.bytes_downloaded += done.entry.size;
            manifest.objects.insert(done.key, done.entry);
            manifest.save(&manifest_path).await?;
        }

        tracing::info!(
            prefix = url_prefix,
            dir = %dir.display(),
            listed = report.listed,
            downloaded = report.downloaded,
            skipped = report.skipped,
            bytes = report.bytes_downloaded,
            elapsed_ms = millis(started.elapsed()),
            "prefix synced"
        );
        Ok(report)
    }

    /// Every object under `prefix`, with its local path under `dir`.
    async fn list(&self, bucket: &str, prefix: &str, dir: &Path) -> Result<Vec<Listed>, S3Error> {
        let mut listed = Vec::new();
        for object in list_objects(&self.client, bucket, prefix).await? {
            let relative = object.key.strip_prefix(prefix).unwrap_or(&object.key);
            let parts = safe_components(relative).filter(|p| p.as_slice() != [MANIFEST_FILE]).ok_or_else(|| {
                S3Error::Invalid(format!("s3://{bucket}/{}: the key cannot be mirrored to a local path", object.key))
            })?;
            let mut local = dir.to_path_buf();
            local.extend(parts);
            listed.push(Listed {
                local,
                entry: Entry {
                    size: object.size,
                    etag: object.etag,
                    last_modified: object.last_modified.as_ref().map(timestamp),
                },
                key: object.key,
            });
        }
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_etags_are_recognised() {
        assert_eq!(plain_md5("\"9E107D9D372BB6826BD81D3542A419D6\""), Some("9e107d9d372bb6826bd81d3542a419d6".into()));
        assert_eq!(plain_md5("9e107d9d372bb6826bd81d3542a419d6"), Some("9e107d9d372bb6826bd81d3542a419d6".into()));
        assert_eq!(plain_md5("\"9e107d9d372bb6826bd81d3542a419d6-3\""), None);
        assert_eq!(plain_md5("\"abc\""), None);
        assert_eq!(
            hex(&Md5::digest(b"The quick brown fox jumps over the lazy dog")),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
    }

    #[test]
    fn manifest_entries_match_on_size_and_etag_or_last_modified() {
        let listed = |etag: Option<&str>, lm: Option<&str>| Listed {
            key: "p/a".into(),
            local: PathBuf::from("/x"),
            entry: Entry { size: 3, etag: etag.map(Into::into), last_modified: lm.map(Into::into) },
        };
        let recorded = Entry { size: 3, etag: Some("\"e\"".into()), last_modified: Some("1.0".into()) };
        assert!(listed(Some("\"e\""), Some("9.0")).matches(&recorded));
        assert!(!listed(Some("\"f\""), Some("1.0")).matches(&recorded));
        assert!(listed(None, Some("1.0")).matches(&recorded));
        assert!(!listed(None, Some("2.0")).matches(&recorded));
        assert!(!listed(None, None).matches(&recorded));
        assert!(!listed(Some("\"e\""), None).matches(&Entry { size: 4, ..recorded }));
    }
}
