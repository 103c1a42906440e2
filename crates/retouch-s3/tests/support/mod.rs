//! A private s3s-fs server per test: free port, own data directory and keys, killed on drop.
//!
//! The binary comes from `RETOUCH_TEST_S3S_BIN` (set by `tests/run`); without it the tests fail
//! instead of skipping.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use retouch_s3::{S3Settings, S3Store};

/// Region the test servers are signed for (s3s-fs accepts any).
pub const REGION: &str = "us-east-1";

/// A running s3s-fs.
pub struct S3sServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory: each top-level directory is a bucket.
    pub data: tempfile::TempDir,
    /// Holds the server's log.
    logs: tempfile::TempDir,
    /// Access key it accepts.
    pub access_key: String,
    /// Secret key it accepts.
    pub secret_key: String,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn s3s_bin() -> PathBuf {
    match std::env::var_os("RETOUCH_TEST_S3S_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => panic!(
            "RETOUCH_TEST_S3S_BIN is not set: these tests need a real s3s-fs 0.14.1. Run them through \
             `tests/run` (e.g. `tests/run -p retouch-s3`), or `eval \"$(tests/run --services-only)\"` first"
        ),
    }
}

static SERVERS: AtomicU32 = AtomicU32::new(0);

impl S3sServer {
    /// Starts a server with the given (empty) buckets and waits until it accepts connections.
    pub fn start(buckets: &[&str]) -> Self {
        let bin = s3s_bin();
        let data = tempfile::tempdir().expect("data dir");
        for bucket in buckets {
            std::fs::create_dir(data.path().join(bucket)).expect("create bucket dir");
        }
        let logs = tempfile::tempdir().expect("log dir");
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let access_key = format!("AKTEST{}X{n}", std::process::id());
        let secret_key = format!("secret-{}-{n}-{:?}", std::process::id(), Instant::now());
        let log_path = logs.path().join("s3s-fs.log");
        // The port is free when picked but may be taken before s3s-fs binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(data.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            if wait_for_port(&mut child, port, Duration::from_secs(10)) {
                return Self { child, port, data, logs, access_key, secret_key };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start; log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Short timeouts and two attempts: failures show in seconds.
    pub fn settings(&self) -> S3Settings {
        test_settings(self.endpoint())
    }

    /// A store with the server's keys.
    pub async fn store(&self) -> S3Store {
        S3Store::with_static_credentials(self.settings(), &self.access_key, &self.secret_key)
            .await
            .expect("build the store")
    }

    /// A store with the right access key and a wrong secret.
    pub async fn store_with_wrong_secret(&self) -> S3Store {
        S3Store::with_static_credentials(self.settings(), &self.access_key, "not-the-secret")
            .await
            .expect("build the store")
    }

    /// Where an object's bytes live on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data.path().join(bucket).join(key)
    }

    /// The server's log so far.
    #[allow(dead_code)]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("s3s-fs.log")).unwrap_or_default()
    }
}

/// Settings for tests: path style, 1 s connect, 5 s per attempt, 10 s per call, 2 attempts.
pub fn test_settings(endpoint: String) -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint),
        region: REGION.into(),
        force_path_style: Some(true),
        connect_timeout: Duration::from_secs(1),
        operation_timeout: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(5),
        max_attempts: 2,
    }
}

fn wait_for_port(child: &mut Child, port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // exited: most likely the port was taken
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for S3sServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files under `dir` (relative, sorted), for asserting what a sync left behind.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).expect("under root").to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
