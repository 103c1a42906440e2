//! Local mode: the engine's seams for one machine with no infrastructure — an in-process
//! queue with the broker's settlement semantics ([`LocalQueue`]), the filesystem as object
//! store ([`FsStore`], `file://` URLs) and a JSON-lines report as result sink
//! ([`JsonlReport`]). `retouch batch` runs the very same engine as `retouch worker` on them.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retouch_core::error::JobError;
use retouch_core::job::{JobResult, ObjectUrl};
use retouch_core::queue::{Delivery, DeliveryInfo, JobSource, QueueError, ResultSink};
use retouch_core::store::{ObjectMeta, ObjectStore, StoreError};
use tokio::sync::Notify;

/// A job the local queue gave up on.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalDeadLetter {
    /// The job body.
    pub body: Vec<u8>,
    /// Its id.
    pub message_id: String,
    /// Why.
    pub error: JobError,
    /// The final attempt.
    pub attempt: u32,
}

struct Entry {
    body: Vec<u8>,
    message_id: String,
    attempt: u32,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Entry>,
    /// Delivered and not yet settled: the queue is not exhausted while any may come back.
    outstanding: usize,
    closed: bool,
    dead: Vec<LocalDeadLetter>,
    released: Vec<String>,
}

/// An in-process job queue: a finite list of jobs, delivered with attempt accounting;
/// `retry` re-enqueues after the delay, `dead_letter` records, the queue ends when every job
/// is settled for good.
#[derive(Clone)]
pub struct LocalQueue {
    state: Arc<Mutex<QueueState>>,
    changed: Arc<Notify>,
    delivery_limit: u32,
}

impl std::fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalQueue").field("delivery_limit", &self.delivery_limit).finish_non_exhaustive()
    }
}

impl LocalQueue {
    /// A queue of `(message_id, body)` jobs; a job is delivered at most `1 + delivery_limit`
    /// times, like a quorum queue with that `x-delivery-limit`.
    pub fn new(jobs: impl IntoIterator<Item = (String, Vec<u8>)>, delivery_limit: u32) -> Self {
        let ready = jobs.into_iter().map(|(message_id, body)| Entry { body, message_id, attempt: 1 }).collect();
        Self {
            state: Arc::new(Mutex::new(QueueState { ready, ..Default::default() })),
            changed: Arc::new(Notify::new()),
            delivery_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Jobs dead-lettered so far.
    pub fn dead_letters(&self) -> Vec<LocalDeadLetter> {
        self.lock().dead.clone()
    }

    /// Ids of jobs given back unstarted (interrupted run).
    pub fn released(&self) -> Vec<String> {
        self.lock().released.clone()
    }

    fn settle(&self, f: impl FnOnce(&mut QueueState)) {
        let mut state = self.lock();
        state.outstanding -= 1;
        f(&mut state);
        drop(state);
        self.changed.notify_waiters();
    }
}

/// A delivery from a [`LocalQueue`].
pub struct LocalDelivery {
    queue: LocalQueue,
    entry: Entry,
    info: DeliveryInfo,
}

impl Delivery for LocalDelivery {
    fn body(&self) -> &[u8] {
        &self.entry.body
    }

    fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    async fn ack(self) -> Result<(), QueueError> {
        self.queue.settle(|_| {});
        Ok(())
    }

    async fn retry(self, delay: Duration) -> Result<(), QueueError> {
        tokio::time::sleep(delay).await;
        let LocalDelivery { queue, mut entry, .. } = self;
        entry.attempt += 1;
        queue.settle(|s| s.ready.push_back(entry));
        Ok(())
    }

    async fn release(self) -> Result<(), QueueError> {
        let LocalDelivery { queue, entry, .. } = self;
        queue.settle(|s| s.released.push(entry.message_id));
        Ok(())
    }

    async fn dead_letter(self, error: &JobError) -> Result<(), QueueError> {
        let LocalDelivery { queue, entry, .. } = self;
        let dead = LocalDeadLetter {
            body: entry.body,
            message_id: entry.message_id,
            error: error.clone(),
            attempt: entry.attempt,
        };
        queue.settle(|s| s.dead.push(dead));
        Ok(())
    }
}

impl JobSource for LocalQueue {
    type Delivery = LocalDelivery;

    async fn next(&mut self) -> Result<Option<LocalDelivery>, QueueError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.closed {
                    return Ok(None);
                }
                if let Some(entry) = state.ready.pop_front() {
                    state.outstanding += 1;
                    let info = DeliveryInfo {
                        message_id: Some(entry.message_id.clone()),
                        attempt: entry.attempt,
                        last_attempt: entry.attempt > self.delivery_limit,
                        ..Default::default()
                    };
                    return Ok(Some(LocalDelivery { queue: self.clone(), entry, info }));
                }
                if state.outstanding == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }

    async fn close(&mut self) -> Result<(), QueueError> {
        self.lock().closed = true;
        self.changed.notify_waiters();
        Ok(())
    }
}

/// The local filesystem as an object store, for `file:///absolute/path` URLs. Writes are
/// atomic (temporary file + rename); user metadata lives in a sidecar
/// `<dir>/.retouch/<file>.json`, which is how an interrupted run recognises finished outputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsStore;

fn local_path(url: &ObjectUrl) -> Result<PathBuf, StoreError> {
    if url.scheme != "file" {
        return Err(StoreError::Invalid(format!("{url}: local mode reads and writes file:// locations only")));
    }
    Ok(PathBuf::from(&url.key))
}

fn sidecar(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.parent().unwrap_or(Path::new("/")).join(".retouch").join(format!("{name}.json"))
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::NotFound(path.display().to_string()),
        std::io::ErrorKind::PermissionDenied => StoreError::Denied(format!("{}: {e}", path.display())),
        _ => StoreError::Transient(format!("{}: {e}", path.display())),
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    tokio::fs::create_dir_all(dir).await.map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    tokio::fs::write(&tmp, bytes).await.map_err(|e| io_error(&tmp, e))?;
    tokio::fs::rename(&tmp, path).await.map_err(|e| io_error(path, e))
}

impl ObjectStore for FsStore {
    async fn get(&self, url: &ObjectUrl, max_bytes: u64) -> Result<Vec<u8>, StoreError> {
        let path = local_path(url)?;
        let size = tokio::fs::metadata(&path).await.map_err(|e| io_error(&path, e))?.len();
        if size > max_bytes {
            return Err(StoreError::TooLarge { size, limit: max_bytes });
        }
        tokio::fs::read(&path).await.map_err(|e| io_error(&path, e))
    }

    async fn head(&self, url: &ObjectUrl) -> Result<Option<ObjectMeta>, StoreError> {
        let path = local_path(url)?;
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, e)),
        };
        let metadata = match tokio::fs::read(sidecar(&path)).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(Some(ObjectMeta { size, etag: None, metadata }))
    }

    async fn put(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        _content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let path = local_path(url)?;
        write_atomically(&path, &body).await?;
        let meta = serde_json::to_vec(metadata).map_err(|e| StoreError::Transient(e.to_string()))?;
        write_atomically(&sidecar(&path), &meta).await
    }
}

/// Appends every result as one JSON line to a report file and hands it to a callback
/// (progress display). Lines are flushed as they are written, so an interrupted run keeps its
/// report.
pub struct JsonlReport {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    on_result: Box<dyn Fn(&JobResult) + Send + Sync>,
}

impl std::fmt::Debug for JsonlReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlReport").finish_non_exhaustive()
    }
}

impl JsonlReport {
    /// Opens `path` for appending.
    ///
    /// # Errors
    /// I/O errors opening the file.
    pub fn append(path: &Path, on_result: impl Fn(&JobResult) + Send + Sync + 'static) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file: Mutex::new(std::io::BufWriter::new(file)), on_result: Box::new(on_result) })
    }
}

impl ResultSink for JsonlReport {
    async fn publish(
        &self,
        result: &JobResult,
        _info: &DeliveryInfo,
        _webhook: Option<&str>,
    ) -> Result<(), QueueError> {
        let line = serde_json::to_string(result).map_err(|e| QueueError::Broker(e.to_string()))?;
        {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            writeln!(file, "{line}").and_then(|()| file.flush()).map_err(|e| QueueError::Unconfirmed(e.to_string()))?;
        }
        (self.on_result)(result);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_queue_ends_only_when_every_job_is_settled() {
        let mut q = LocalQueue::new([("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())], 1);
        let a = q.next().await.expect("ok").expect("a");
        let b = q.next().await.expect("ok").expect("b");
        assert_eq!(a.info().attempt, 1);
        b.ack().await.expect("ack");
        // `a` may still come back: the queue must not end yet.
        let waiter = tokio::spawn({
            let mut q = q.clone();
            async move { q.next().await.expect("ok").map(|d| (d.info().attempt, d.info().last_attempt)) }
        });
        a.retry(Duration::from_secs(1)).await.expect("retry");
        assert_eq!(waiter.await.expect("join"), Some((2, true)));
        let again = q.dead_letters();
        assert!(again.is_empty());
    }

    #[tokio::test]
    async fn fs_store_round_trips_with_metadata() {
        let dir = std::env::temp_dir().join(format!("retouch-fs-{}", std::process::id()));
        let url = ObjectUrl::parse(&format!("file://{}/out/x.png", dir.display())).expect("url");
        assert_eq!(FsStore.head(&url).await.expect("head"), None);
        let meta = BTreeMap::from([("retouch-job-id".to_string(), "j".to_string())]);
        FsStore.put(&url, b"png".to_vec(), "image/png", &meta).await.expect("put");
        let head = FsStore.head(&url).await.expect("head").expect("exists");
        assert_eq!((head.size, head.metadata), (3, meta));
        assert_eq!(FsStore.get(&url, 10).await.expect("get"), b"png");
        assert!(matches!(FsStore.get(&url, 2).await, Err(StoreError::TooLarge { .. })));
        let s3 = ObjectUrl::parse("s3://bucket/key").expect("url");
        assert!(matches!(FsStore.get(&s3, 10).await, Err(StoreError::Invalid(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
