//! `S3Store` against a real s3s-fs 0.14.1 (SigV4 checked), one private server per test.
//!
//! Needs `RETOUCH_TEST_S3S_BIN`: run through `tests/run -p retouch-s3`.

mod support;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use retouch_core::job::ObjectUrl;
use retouch_core::store::{ObjectStore, StoreError};
use retouch_s3::{CREDENTIALS_HINT, MANIFEST_FILE, PutOutcome, S3Error, S3Store};
use support::{S3sServer, files_under, free_port, test_settings};

fn url(s: &str) -> ObjectUrl {
    ObjectUrl::parse(s).expect("valid url")
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Deterministic, not very compressible bytes.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

#[tokio::test]
async fn put_get_head_round_trip_keeps_content_type_and_user_metadata() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let u = url("s3://media/inputs/cat.png");
    let body = bytes(4096, 1);
    // S3 lower-cases user metadata names; the seam promises lower-case keys.
    let sent = meta(&[("job-id", "job-1"), ("Seed", "42")]);
    store.put(&u, body.clone(), "image/png", &sent).await.expect("put");

    assert_eq!(store.get(&u, 1 << 20).await.expect("get"), body);

    let head = store.head(&u).await.expect("head").expect("exists");
    assert_eq!(head.size, 4096);
    assert_eq!(head.metadata, meta(&[("job-id", "job-1"), ("seed", "42")]));
    let etag = head.etag.expect("s3s-fs sends an ETag");
    assert_eq!(etag.len(), 34, "a quoted MD5: {etag}");

    // Content type is not part of ObjectMeta: read it through the raw client, on HEAD and GET.
    let raw = store.client().head_object().bucket("media").key("inputs/cat.png").send().await.expect("raw head");
    assert_eq!(raw.content_type(), Some("image/png"));
    let raw = store.client().get_object().bucket("media").key("inputs/cat.png").send().await.expect("raw get");
    assert_eq!(raw.content_type(), Some("image/png"));
    assert_eq!(raw.metadata().and_then(|m| m.get("job-id")).map(String::as_str), Some("job-1"));

    // A second put replaces body, type and metadata.
    store.put(&u, b"x".to_vec(), "image/webp", &BTreeMap::new()).await.expect("overwrite");
    let head = store.head(&u).await.expect("head").expect("exists");
    assert_eq!((head.size, head.metadata.len()), (1, 0));
}

#[tokio::test]
async fn missing_key_is_not_found_and_head_is_none() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let u = url("s3://media/nope.png");
    let got = store.get(&u, 1024).await;
    assert!(matches!(&got, Err(StoreError::NotFound(m)) if m.contains("NoSuchKey")), "{got:?}");
    assert_eq!(store.head(&u).await, Ok(None));
}

#[tokio::test]
async fn missing_bucket() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let u = url("s3://no-such-bucket/a.png");
    // AWS answers NoSuchBucket; s3s-fs 0.14.1 answers NoSuchKey: either way NotFound.
    let got = store.get(&u, 1024).await;
    assert!(matches!(&got, Err(StoreError::NotFound(m)) if m.contains("no-such-bucket")), "{got:?}");
    // HEAD answers have no body: a missing bucket reads like a missing key.
    assert_eq!(store.head(&u).await, Ok(None));
    let check = store.check_bucket("no-such-bucket").await;
    assert!(matches!(&check, Err(S3Error::Store(StoreError::NotFound(_)))), "{check:?}");
    // s3s-fs 0.14.1 quirk: PutObject into a missing bucket creates the bucket directory and
    // succeeds (AWS, MinIO: 404 NoSuchBucket, classified NotFound by the unit tests).
    let put = store.put(&u, vec![1], "image/png", &BTreeMap::new()).await;
    println!("put into a missing bucket on s3s-fs: {put:?}");
    assert!(matches!(&put, Ok(()) | Err(StoreError::NotFound(_))), "{put:?}");
}

#[tokio::test]
async fn objects_over_the_limit_are_too_large() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let u = url("s3://media/big.png");
    store.put(&u, bytes(1000, 2), "image/png", &BTreeMap::new()).await.expect("put");
    assert_eq!(store.get(&u, 999).await, Err(StoreError::TooLarge { size: 1000, limit: 999 }));
    assert_eq!(store.get(&u, 1000).await.expect("at the limit").len(), 1000);
}

#[tokio::test]
async fn non_s3_locations_are_invalid() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let file = url("file:///tmp/in.png");
    assert!(matches!(store.get(&file, 10).await, Err(StoreError::Invalid(_))));
    assert!(matches!(store.head(&file).await, Err(StoreError::Invalid(_))));
    assert!(matches!(store.put(&file, vec![], "image/png", &BTreeMap::new()).await, Err(StoreError::Invalid(_))));
}

#[tokio::test]
async fn wrong_secret_is_denied_with_the_credentials_hint() {
    let server = S3sServer::start(&["media"]);
    server
        .store()
        .await
        .put(&url("s3://media/a.png"), vec![1, 2, 3], "image/png", &BTreeMap::new())
        .await
        .expect("put");
    let store = server.store_with_wrong_secret().await;
    let u = url("s3://media/a.png");

    let got = store.get(&u, 1024).await;
    assert!(
        matches!(&got, Err(StoreError::Denied(m)) if m.contains("SignatureDoesNotMatch") && m.contains(CREDENTIALS_HINT)),
        "{got:?}"
    );
    assert!(matches!(store.head(&u).await, Err(StoreError::Denied(m)) if m.contains(CREDENTIALS_HINT)));
    let put = store.put(&u, vec![9], "image/png", &BTreeMap::new()).await;
    assert!(matches!(&put, Err(StoreError::Denied(m)) if m.contains(CREDENTIALS_HINT)), "{put:?}");
    let check = store.check_bucket("media").await;
    assert!(matches!(&check, Err(S3Error::Store(StoreError::Denied(m))) if m.contains(CREDENTIALS_HINT)), "{check:?}");
    println!("wrong secret: {}", check.expect_err("denied"));
}

#[tokio::test]
async fn closed_port_is_transient_within_the_timeouts() {
    let port = free_port(); // nobody listens there
    let store = S3Store::with_static_credentials(test_settings(format!("http://127.0.0.1:{port}")), "AK", "SK")
        .await
        .expect("store");
    let started = Instant::now();
    let got = store.get(&url("s3://media/a.png"), 1024).await;
    let elapsed = started.elapsed();
    println!("closed port: {elapsed:?}: {got:?}");
    assert!(matches!(&got, Err(StoreError::Transient(m)) if m.contains("could not reach")), "{got:?}");
    // Connection refused is immediate; two attempts with at most ~1 s of jittered back-off.
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let check = store.check_bucket("media").await;
    assert!(matches!(&check, Err(e) if e.is_retryable()), "{check:?}");
}

#[tokio::test]
async fn unresponsive_server_times_out_as_transient() {
    // Accepts connections (the kernel completes the handshake) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut settings = test_settings(format!("http://127.0.0.1:{port}"));
    settings.attempt_timeout = Duration::from_millis(300);
    settings.operation_timeout = Duration::from_secs(3);
    let store = S3Store::with_static_credentials(settings, "AK", "SK").await.expect("store");
    let started = Instant::now();
    let got = store.head(&url("s3://media/a.png")).await;
    let elapsed = started.elapsed();
    println!("unresponsive server: {elapsed:?}: {got:?}");
    assert!(matches!(&got, Err(StoreError::Transient(m)) if m.contains("timed out")), "{got:?}");
    // Two 300 ms attempts plus back-off, well inside the 3 s operation budget.
    assert!(elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    drop(listener);
}

#[tokio::test]
async fn check_bucket_accepts_an_existing_bucket_and_names_a_missing_one() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    store.check_bucket("media").await.expect("bucket exists");
    let missing = store.check_bucket("no-such-bucket").await;
    println!("missing bucket: {}", missing.as_ref().expect_err("missing"));
    assert!(
        matches!(&missing, Err(S3Error::Store(StoreError::NotFound(m))) if m.contains("\"no-such-bucket\" does not exist")),
        "{missing:?}"
    );
    assert!(!missing.expect_err("missing").is_retryable());
}

#[tokio::test]
async fn put_if_absent_writes_once() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    let u = url("s3://media/results/job-1.png");
    let first = store.put_if_absent(&u, b"first".to_vec(), "image/png", &meta(&[("job-id", "job-1")])).await;
    assert_eq!(first, Ok(PutOutcome::Created));
    let second = store.put_if_absent(&u, b"second!".to_vec(), "image/png", &BTreeMap::new()).await;
    assert_eq!(second, Ok(PutOutcome::AlreadyExists));
    assert_eq!(store.get(&u, 100).await.expect("get"), b"first");
}

#[tokio::test]
async fn list_prefix_walks_the_prefix_in_key_order() {
    let server = S3sServer::start(&["media"]);
    let store = server.store().await;
    for (key, len) in [("raw/b.png", 3), ("raw/a.png", 5), ("raw/deep/c.jpg", 7), ("raw-old/x.png", 1), ("y.png", 2)] {
        store.put(&url(&format!("s3://media/{key}")), bytes(len, 1), "image/png", &BTreeMap::new()).await.expect("put");
    }
    let listed = |prefix: &'static str| {
        let store = &store;
        async move {
            let objects = store.list_prefix(prefix).await.expect("list");
            objects.into_iter().map(|(u, size)| (u.to_string(), size)).collect::<Vec<_>>()
        }
    };
    let raw = [("s3://media/raw/a.png", 5), ("s3://media/raw/b.png", 3), ("s3://media/raw/deep/c.jpg", 7)]
        .map(|(u, n)| (u.to_string(), n));
    assert_eq!(listed("s3://media/raw/").await, raw);
    assert_eq!(listed("s3://media/raw").await, raw, "the prefix is a directory, not a string prefix");
    assert_eq!(listed("s3://media").await.len(), 5, "the whole bucket");
    assert!(matches!(store.list_prefix("file:///media").await, Err(S3Error::Invalid(_))));
}

#[tokio::test]
async fn sync_prefix_mirrors_skips_and_refreshes() {
    let server = S3sServer::start(&["models"]);
    let store = server.store().await;
    let objects = [
        ("ip2p/v1/model_index.json", bytes(120, 3)),
        ("ip2p/v1/unet/config.json", bytes(700, 4)),
        ("ip2p/v1/unet/diffusion_pytorch_model.safetensors", bytes(300_000, 5)),
        ("ip2p/v2/other.json", bytes(10, 6)),     // outside the prefix
        ("ip2p/v1-old/stale.json", bytes(10, 7)), // shares the string prefix, not the directory
    ];
    for (key, body) in &objects {
        store
            .put(&url(&format!("s3://models/{key}")), body.clone(), "application/octet-stream", &BTreeMap::new())
            .await
            .expect("put");
    }
    let cache = tempfile::tempdir().expect("cache");

    // First sync: everything under the prefix, nested paths included.
    let started = Instant::now();
    let report = store.sync_prefix_report("s3://models/ip2p/v1", cache.path()).await.expect("sync");
    println!("first sync: {:?} {report:?}", started.elapsed());
    let dir = cache.path().join("models/ip2p/v1");
    assert_eq!(report.dir, dir);
    assert_eq!((report.listed, report.downloaded, report.skipped), (3, 3, 0));
    assert_eq!(report.bytes_downloaded, 120 + 700 + 300_000);
    assert_eq!(
        files_under(&dir),
        [MANIFEST_FILE, "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    );
    for (key, body) in &objects[..3] {
        let local = dir.join(key.strip_prefix("ip2p/v1/").expect("prefix"));
        assert_eq!(&std::fs::read(&local).expect("mirrored file"), body, "{key}");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).expect("manifest")).expect("json");
    assert_eq!(manifest["objects"]["ip2p/v1/unet/config.json"]["size"], 700);
    let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    let weights_mtime = std::fs::metadata(&weights).expect("meta").modified().expect("mtime");

    // Second sync: nothing to do, files untouched.
    let report = store.sync_prefix_report("s3://models/ip2p/v1/", cache.path()).await.expect("resync");
    assert_eq!((report.listed, report.downloaded, report.skipped), (3, 0, 3));
    assert_eq!(std::fs::metadata(&weights).expect("meta").modified().expect("mtime"), weights_mtime);

    // A changed object is downloaded again, and only it.
    let changed = bytes(900, 8);
    store
        .put(&url("s3://models/ip2p/v1/unet/config.json"), changed.clone(), "application/json", &BTreeMap::new())
        .await
        .expect("put");
    let report = store.sync_prefix_report("s3://models/ip2p/v1", cache.path()).await.expect("sync after change");
    assert_eq!((report.downloaded, report.skipped), (1, 2));
    assert_eq!(std::fs::read(dir.join("unet/config.json")).expect("file"), changed);

    // A same-size rewrite: s3s-fs lists no ETags, so only LastModified (milliseconds in the
    // listing) can tell.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let same_size = bytes(900, 9);
    store
        .put(&url("s3://models/ip2p/v1/unet/config.json"), same_size.clone(), "application/json", &BTreeMap::new())
        .await
        .expect("put");
    let report = store.sync_prefix_report("s3://models/ip2p/v1", cache.path()).await.expect("sync after rewrite");
    assert_eq!((report.downloaded, report.skipped), (1, 2));
    assert_eq!(std::fs::read(dir.join("unet/config.json")).expect("file"), same_size);

    // A local file that went missing is restored, even though the manifest lists it.
    std::fs::remove_file(dir.join("model_index.json")).expect("remove");
    let path = store.sync_prefix("s3://models/ip2p/v1", cache.path()).await.expect("repair");
    assert_eq!(path, dir);
    assert_eq!(std::fs::read(dir.join("model_index.json")).expect("restored"), objects[0].1);
    assert!(files_under(&dir).iter().all(|f| !f.ends_with(".part") && !f.ends_with(".tmp")), "{:?}", files_under(&dir));
}

#[tokio::test]
async fn sync_prefix_detects_a_corrupt_download() {
    let server = S3sServer::start(&["models"]);
    let store = server.store().await;
    store
        .put(&url("s3://models/m/a.bin"), bytes(5000, 1), "application/octet-stream", &BTreeMap::new())
        .await
        .expect("put");
    // Corrupt the stored bytes behind the server's back (same size): its ETag, kept from the PUT,
    // no longer matches the MD5 of what it serves.
    std::fs::write(server.object_path("models", "m/a.bin"), bytes(5000, 2)).expect("corrupt");
    let cache = tempfile::tempdir().expect("cache");
    let got = store.sync_prefix("s3://models/m/", cache.path()).await;
    assert!(matches!(&got, Err(S3Error::Integrity { message, .. }) if message.contains("MD5")), "{got:?}");
    assert!(got.expect_err("corrupt").is_retryable());
    // Nothing half-written is left behind, and nothing was recorded.
    let left = files_under(&cache.path().join("models/m"));
    assert!(left.is_empty() || left == [MANIFEST_FILE], "{left:?}");
}

#[tokio::test]
async fn sync_prefix_of_a_missing_bucket_or_a_bad_prefix_fails_clearly() {
    let server = S3sServer::start(&["models"]);
    let store = server.store().await;
    let cache = tempfile::tempdir().expect("cache");
    let missing = store.sync_prefix("s3://no-such-bucket/m/", cache.path()).await;
    assert!(matches!(&missing, Err(S3Error::Store(StoreError::NotFound(_)))), "{missing:?}");
    let bad = store.sync_prefix("s3://models/../etc", cache.path()).await;
    assert!(matches!(&bad, Err(S3Error::Invalid(_))), "{bad:?}");
    // An empty prefix mirrors nothing but still yields the directory.
    let empty = store.sync_prefix_report("s3://models/none/", cache.path()).await.expect("empty prefix");
    assert_eq!((empty.listed, empty.downloaded), (0, 0));
}

/// Serves one canned `200` to one request and returns the request's head (lower-cased).
fn capture_one_request(listener: TcpListener, response: &'static str) -> std::thread::JoinHandle<String> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().expect("accept");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).expect("read");
            assert!(n > 0, "connection closed before the request head");
            seen.extend_from_slice(&buf[..n]);
        }
        let head_len = seen.windows(4).position(|w| w == b"\r\n\r\n").expect("head end") + 4;
        let head = String::from_utf8_lossy(&seen[..head_len]).to_ascii_lowercase();
        let body_len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().expect("content-length"));
        let mut body = seen.len() - head_len;
        while body < body_len {
            body += socket.read(&mut buf).expect("read body");
        }
        socket.write_all(response.as_bytes()).expect("respond");
        head
    })
}

#[tokio::test]
async fn requests_carry_no_default_checksums() {
    // What non-AWS stores reject: `x-amz-checksum-*`, `x-amz-sdk-checksum-algorithm`,
    // `aws-chunked` bodies on PUT, and `x-amz-checksum-mode` (response validation) on GET.
    let forbidden = ["x-amz-checksum", "x-amz-sdk-checksum-algorithm", "aws-chunked", "x-amz-trailer"];

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = capture_one_request(listener, "HTTP/1.1 200 OK\r\netag: \"x\"\r\ncontent-length: 0\r\n\r\n");
    let store = S3Store::with_static_credentials(test_settings(format!("http://127.0.0.1:{port}")), "AK", "SK")
        .await
        .expect("store");
    store
        .put(&url("s3://media/out.png"), bytes(70_000, 1), "image/png", &meta(&[("job-id", "j1")]))
        .await
        .expect("put");
    let head = server.join().expect("capture");
    println!("PutObject request head:\n{head}");
    assert!(head.starts_with("put /media/out.png?") || head.starts_with("put /media/out.png "), "path-style: {head}");
    assert!(head.contains("content-type: image/png") && head.contains("x-amz-meta-job-id: j1"), "{head}");
    assert!(head.contains("content-length: 70000"), "{head}");
    for header in forbidden {
        assert!(!head.contains(header), "PutObject sent {header}: {head}");
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = capture_one_request(listener, "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc");
    let store = S3Store::with_static_credentials(test_settings(format!("http://127.0.0.1:{port}")), "AK", "SK")
        .await
        .expect("store");
    assert_eq!(store.get(&url("s3://media/in.png"), 10).await.expect("get"), b"abc");
    let head = server.join().expect("capture");
    assert!(!head.contains("x-amz-checksum-mode"), "GetObject asked for checksum validation: {head}");
}
