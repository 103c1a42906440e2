//! The end-to-end harness: real services, the real `retouch` binary as a separate process.
//!
//! * [`Env`]: what `tests/run` exports (broker URL, the s3s-fs binary, the private-node
//!   script, promtool). A missing variable fails the test with instructions — never a skip.
//! * [`S3Server`]: an s3s-fs process (SigV4-checking) with its own data dir and keys; can be
//!   stopped and restarted on the same port.
//! * [`Broker`]: per-test names (`e2e.<test>.<nonce>.*`); publishes jobs through retouch-amqp's
//!   [`AmqpPublisher`] (so an unroutable job fails the test) and inspects with plain lapin:
//!   results from a queue bound to the results exchange, queue depths, dead letters.
//! * [`Worker`]: `retouch worker` configured through `RETOUCH_*` variables; SIGKILL, SIGTERM,
//!   exit status, logs, `/metrics` — as a process of the host binary, or as a container of a
//!   worker image ([`Worker::start_container`], as the Helm chart runs it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
pub use retouch_amqp::JobPublishOptions;
use retouch_amqp::{AmqpPublisher, OutgoingJob};
pub use retouch_core::events::{CancelRequest, EventType, JobEvent};
use retouch_core::job::JobResult;
use retouch_core::queue::QueueCounters;

pub mod faults;
pub use faults::{Exchange, Fault, FaultProxy, Rule};

/// Access key every test S3 server accepts.
pub const ACCESS_KEY: &str = "e2e-access";
/// Secret key every test S3 server accepts.
pub const SECRET_KEY: &str = "e2e-secret";

/// The services `tests/run` provides.
#[derive(Clone, Debug)]
pub struct Env {
    /// The shared broker.
    pub amqp_url: String,
    /// The s3s-fs binary.
    pub s3s_bin: PathBuf,
    /// `rabbitmq-node.sh` for a private, restartable broker.
    pub rabbitmq_node: PathBuf,
    /// promtool.
    pub promtool: PathBuf,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the end-to-end tests through ./tests/run, which starts the real services")
    })
}

impl Env {
    /// Reads the environment.
    ///
    /// # Panics
    /// When a variable is missing (run through `tests/run`).
    pub fn get() -> Self {
        Self {
            amqp_url: required("RETOUCH_TEST_AMQP_URL"),
            s3s_bin: required("RETOUCH_TEST_S3S_BIN").into(),
            rabbitmq_node: required("RETOUCH_TEST_RABBITMQ_NODE").into(),
            promtool: required("RETOUCH_TEST_PROMTOOL").into(),
        }
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

/// The committed tiny checkpoint.
pub fn tiny_model() -> PathBuf {
    workspace().join("tests/fixtures/models/tiny-sd15")
}

/// The `retouch` binary built alongside the tests (`RETOUCH_BIN` overrides).
pub fn retouch_bin() -> PathBuf {
    if let Ok(path) = std::env::var("RETOUCH_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("retouch");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p retouch-cli), or run ./tests/run",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A unique prefix for one test's broker objects and buckets.
pub fn unique(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("e2e-{test}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
///
/// # Panics
/// On timeout, with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The committed fixtures: `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures")
}

/// An image file as RGB (panics naming the file).
pub fn open_rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// The largest difference of one uint8 channel value between two images of the same size.
pub fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// A temporary directory (removed when dropped) whose name starts with `name`.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("{name}-")).tempdir().expect("temporary directory")
}

/// An s3s-fs server: each directory under its root is a bucket.
pub struct S3Server {
    bin: PathBuf,
    /// The data directory (`<dir>/data`).
    pub root: PathBuf,
    /// Its port.
    pub port: u16,
    child: Option<Child>,
    /// Holds the data directory and the log; removed after the server stops.
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with the given buckets.
    pub fn start(env: &Env, name: &str, buckets: &[&str]) -> Self {
        let dir = temp_dir(&format!("{name}-s3"));
        let root = dir.path().join("data");
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).expect("bucket dir");
        }
        let mut server = Self { bin: env.s3s_bin.clone(), root, port: free_port(), child: None, dir };
        server.resume();
        server
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Puts a file into `bucket/key`.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path = self.root.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write object");
    }

    /// Reads `bucket/key`, if present.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(bucket).join(key)).ok()
    }

    /// Stops the server (the port stays reserved by convention: `resume` reuses it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on its port and waits until it accepts connections.
    pub fn resume(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("s3s.log")).expect("log");
        let child = Command::new(&self.bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(&self.root)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_for("s3s-fs to listen", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        });
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One test's view of a broker: its own exchange/queue names and a results queue. Jobs go out
/// through [`AmqpPublisher`] (the project's one confirmed publish); a plain lapin connection
/// inspects queues.
pub struct Broker {
    /// Name prefix of this test's objects.
    pub prefix: String,
    /// The broker URL.
    pub url: String,
    /// Drives the publisher and the inspection connection (only while a method runs).
    runtime: tokio::runtime::Runtime,
    /// Publishes jobs; reconnects by itself after a broker restart.
    publisher: Option<AmqpPublisher>,
    /// Inspection channel (`basic.get`, passive declares, clean-up).
    channel: Option<Channel>,
    /// Its connection.
    connection: Option<Connection>,
    /// Progress events met while reading results (the tap queue is bound with `#`), in order.
    pub events: Vec<JobEvent>,
}

impl Broker {
    /// Connects and declares the topology the worker will use (as the worker would), plus a
    /// queue bound to the results exchange with `#`.
    pub fn new(url: &str, prefix: &str, delivery_limit: u32) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut broker = Self {
            prefix: prefix.to_string(),
            url: url.to_string(),
            runtime,
            publisher: None,
            channel: None,
            connection: None,
            events: Vec::new(),
        };
        broker.reconnect();
        let settings = broker.settings(delivery_limit);
        let channel = broker.channel();
        let publisher = broker.runtime.block_on(async {
            // Declares the topology, as the worker will.
            let publisher = AmqpPublisher::connect(settings.clone(), Arc::new(QueueCounters::default()))
                .await
                .expect("publisher (declares the topology)");
            channel
                .queue_declare(
                    broker.results_queue().as_str().into(),
                    QueueDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .expect("results queue");
            channel
                .queue_bind(
                    broker.results_queue().as_str().into(),
                    settings.results_exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind results");
            publisher
        });
        broker.publisher = Some(publisher);
        broker
    }

    /// (Re)opens the inspection connection, retrying for up to 60 s (the broker may be
    /// restarting); the publisher reconnects by itself.
    pub fn reconnect(&mut self) {
        let url = self.url.clone();
        let (connection, channel) = wait_for("the broker to accept a connection", Duration::from_secs(60), || {
            self.runtime.block_on(async {
                let connection = Connection::connect(&url, ConnectionProperties::default()).await.ok()?;
                let channel = connection.create_channel().await.ok()?;
                Some((connection, channel))
            })
        });
        self.connection = Some(connection);
        self.channel = Some(channel);
    }

    fn channel(&self) -> Channel {
        self.channel.clone().expect("connected")
    }

    /// The worker's broker settings for this test.
    pub fn settings(&self, delivery_limit: u32) -> retouch_amqp::AmqpSettings {
        retouch_amqp::AmqpSettings {
            url: self.url.clone(),
            jobs_exchange: format!("{}.jobs", self.prefix),
            jobs_queue: format!("{}.jobs", self.prefix),
            results_exchange: format!("{}.results", self.prefix),
            dead_letter_exchange: format!("{}.dlx", self.prefix),
            dead_letter_queue: format!("{}.dead", self.prefix),
            high_priority_queue: format!("{}.jobs.high", self.prefix),
            high_priority_routing_key: format!("{}.jobs.high", self.prefix),
            cancel_exchange: format!("{}.cancel", self.prefix),
            cancel_stream: format!("{}.cancel", self.prefix),
            webhook_queue: format!("{}.webhooks", self.prefix),
            webhook_dead_queue: format!("{}.webhooks.dead", self.prefix),
            delivery_limit,
            ..retouch_amqp::AmqpSettings::default()
        }
    }

    /// `RETOUCH_*` variables pointing a worker at this test's objects.
    pub fn worker_env(&self, delivery_limit: u32) -> Vec<(String, String)> {
        let s = self.settings(delivery_limit);
        [
            ("RETOUCH_AMQP_URL", s.url),
            ("RETOUCH_AMQP_JOBS_EXCHANGE", s.jobs_exchange),
            ("RETOUCH_AMQP_JOBS_QUEUE", s.jobs_queue),
            ("RETOUCH_AMQP_RESULTS_EXCHANGE", s.results_exchange),
            ("RETOUCH_AMQP_DEAD_LETTER_EXCHANGE", s.dead_letter_exchange),
            ("RETOUCH_AMQP_DEAD_LETTER_QUEUE", s.dead_letter_queue),
            ("RETOUCH_AMQP_HIGH_PRIORITY_QUEUE", s.high_priority_queue),
            ("RETOUCH_AMQP_HIGH_PRIORITY_ROUTING_KEY", s.high_priority_routing_key),
            ("RETOUCH_AMQP_CANCEL_EXCHANGE", s.cancel_exchange),
            ("RETOUCH_AMQP_CANCEL_STREAM", s.cancel_stream),
            ("RETOUCH_AMQP_WEBHOOK_QUEUE", s.webhook_queue),
            ("RETOUCH_AMQP_WEBHOOK_DEAD_QUEUE", s.webhook_dead_queue),
            ("RETOUCH_AMQP_DELIVERY_LIMIT", delivery_limit.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn results_queue(&self) -> String {
        format!("{}.results-tap", self.prefix)
    }

    /// Publishes a raw job body through [`AmqpPublisher::publish_job`] (persistent,
    /// `mandatory`, confirmed, with a timestamp).
    ///
    /// # Panics
    /// When the broker does not confirm it, or returns it as unroutable.
    pub fn publish(&self, body: &[u8], message_id: &str) {
        let publisher = self.publisher.as_ref().expect("connected");
        self.runtime
            .block_on(publisher.publish_job(body, message_id, JobPublishOptions::default()))
            .unwrap_or_else(|e| panic!("job {message_id} not delivered: {e}"));
    }

    /// Publishes a protocol job.
    pub fn publish_json(&self, job: &serde_json::Value) {
        let id = job["job_id"].as_str().unwrap_or("no-id").to_string();
        self.publish(&serde_json::to_vec(job).expect("json"), &id);
    }

    /// Publishes protocol jobs with `options` (priority, `reply_to`), pipelined, confirmed.
    pub fn publish_many(&self, jobs: &[serde_json::Value], options: &JobPublishOptions) {
        let publisher = self.publisher.as_ref().expect("connected");
        let outgoing = jobs.iter().map(|job| OutgoingJob {
            body: serde_json::to_vec(job).expect("json"),
            message_id: job["job_id"].as_str().unwrap_or("no-id").to_string(),
            options: options.clone(),
        });
        let n = self.runtime.block_on(publisher.publish_jobs(outgoing)).expect("jobs confirmed");
        assert_eq!(n as usize, jobs.len());
    }

    /// Publishes a cancel request as `retouch cancel` does.
    pub fn cancel(&self, request: &CancelRequest) {
        let publisher = self.publisher.as_ref().expect("connected");
        self.runtime.block_on(publisher.publish_cancel(request)).expect("cancel confirmed");
    }

    /// Takes results in arrival order until `n` distinct jobs have one (progress events are
    /// kept in [`events`](Self::events)).
    pub fn results_in_order(&mut self, n: usize, timeout: Duration) -> Vec<JobResult> {
        let mut seen = std::collections::BTreeSet::new();
        let mut order = Vec::new();
        let deadline = Instant::now() + timeout;
        while seen.len() < n {
            assert!(Instant::now() < deadline, "timed out with {} of {n} results", seen.len());
            match self.next_result() {
                Some(r) => {
                    if seen.insert(r.job_id.clone()) {
                        order.push(r);
                    }
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        order
    }

    /// The next result of the tap queue, if one is there; progress events on the way are
    /// moved to [`events`](Self::events).
    fn next_result(&mut self) -> Option<JobResult> {
        let queue = self.results_queue();
        loop {
            let message = self.get(&queue)?;
            if message.delivery.properties.kind().as_ref().is_some_and(|k| k.as_str() == "progress") {
                self.events.push(serde_json::from_slice(&message.delivery.data).expect("event json"));
                continue;
            }
            return Some(serde_json::from_slice(&message.delivery.data).expect("result json"));
        }
    }

    /// Declares a durable queue `<prefix>.<suffix>` of this test (a `reply_to` target) and
    /// returns its name; it is deleted with the broker objects.
    pub fn declare_queue(&self, suffix: &str) -> String {
        assert_eq!(suffix, "replies", "only the replies queue is cleaned up");
        let name = format!("{}.{suffix}", self.prefix);
        let channel = self.channel();
        self.runtime.block_on(async {
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .expect("declare the queue");
        });
        name
    }

    /// Drains a queue of this test (`webhooks.dead`, …): `(body, headers)` per message.
    pub fn drain(&self, suffix: &str) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        self.drain_queue(&format!("{}.{suffix}", self.prefix))
    }

    fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let channel = self.channel();
        self.runtime.block_on(async {
            channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap_or_else(|e| panic!("basic.get from {queue} failed: {e}"))
        })
    }

    /// Collects results until `done` says so, by job id (the latest result per job).
    pub fn results_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, JobResult>) -> bool,
    ) -> BTreeMap<String, JobResult> {
        let mut results = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        while !done(&results) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for results; got {:?}",
                results.keys().collect::<Vec<_>>()
            );
            match self.next_result() {
                Some(r) => {
                    results.insert(r.job_id.clone(), r);
                }
                None => {
                    if self.channel.as_ref().is_some_and(|c| !c.status().connected()) {
                        self.reconnect();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        results
    }

    /// Every result available right now, by job id.
    pub fn drain_results(&mut self) -> BTreeMap<String, JobResult> {
        let mut results = BTreeMap::new();
        while let Some(r) = self.next_result() {
            results.insert(r.job_id.clone(), r);
        }
        results
    }

    /// Messages ready in a queue of this test (`jobs`, `dead`).
    pub fn ready(&self, suffix: &str) -> u32 {
        let channel = self.channel();
        let name = format!("{}.{suffix}", self.prefix);
        self.runtime.block_on(async {
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("queue {name} cannot be inspected: {e}"))
                .message_count()
        })
    }

    /// Drains the dead-letter queue until at least `n` letters have arrived, keeping what each
    /// poll took (the gets acknowledge); fails after `timeout`.
    pub fn dead_letters_until(&self, n: usize, timeout: Duration) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        let mut seen = Vec::new();
        wait_for(&format!("{n} dead letters"), timeout, || {
            seen.extend(self.dead_letters());
            (seen.len() >= n).then(|| std::mem::take(&mut seen))
        })
    }

    /// Drains the dead-letter queue: `(body, headers)` per message.
    pub fn dead_letters(&self) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        self.drain_queue(&format!("{}.dead", self.prefix))
    }

    fn drain_queue(&self, queue: &str) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        let mut out = Vec::new();
        while let Some(message) = self.get(queue) {
            let mut headers = BTreeMap::new();
            if let Some(table) = message.delivery.properties.headers() {
                for (k, v) in table.inner() {
                    let text = match v {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        AMQPValue::ShortString(s) => s.as_str().to_string(),
                        AMQPValue::LongInt(i) => i.to_string(),
                        AMQPValue::LongLongInt(i) => i.to_string(),
                        other => format!("{other:?}"),
                    };
                    headers.insert(k.as_str().to_string(), text);
                }
            }
            out.push((message.delivery.data.clone(), headers));
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            self.runtime.block_on(publisher.shutdown());
        }
        let Some(channel) = self.channel.clone() else { return };
        let prefix = self.prefix.clone();
        let results = self.results_queue();
        self.runtime.block_on(async move {
            for q in [
                format!("{prefix}.jobs"),
                format!("{prefix}.jobs.high"),
                format!("{prefix}.dead"),
                format!("{prefix}.cancel"),
                format!("{prefix}.webhooks"),
                format!("{prefix}.webhooks.dead"),
                format!("{prefix}.replies"),
                results,
            ] {
                let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            }
            for e in ["jobs", "results", "dlx", "cancel"] {
                let _ = channel
                    .exchange_delete(format!("{prefix}.{e}").as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        });
    }
}

/// A `retouch worker` process, or a container running one.
pub struct Worker {
    /// The worker process, or the `docker run` client attached to its container.
    child: Option<Child>,
    /// The container's name, when the worker runs in one (signals go to the container's PID 1
    /// through the engine, as a kubelet sends them).
    container: Option<String>,
    /// Its log file (stdout + stderr).
    pub log: PathBuf,
    /// Its `/metrics` port.
    pub metrics_port: u16,
    /// Holds the log; removed after the process is gone.
    _dir: tempfile::TempDir,
}

/// Where the committed tiny checkpoint is mounted in a worker container: inside the image's
/// model cache volume, read-only.
pub const CONTAINER_MODEL_DIR: &str = "/var/cache/retouch/models/tiny-sd15";

/// `docker run` options that match the Helm chart's pod: non-root (the image's uid 10001), a
/// read-only root filesystem with `/tmp` as the only scratch space (the chart's emptyDir), every
/// capability dropped, no privilege escalation, the default seccomp profile; the host's network
/// (the test services listen on 127.0.0.1).
pub const CHART_LIKE_DOCKER_RUN: &[&str] = &[
    "--network=host",
    "--read-only",
    "--user=10001:10001",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--tmpfs=/tmp:rw,nosuid,nodev,size=256m",
];

impl Worker {
    /// Starts a worker with the tiny model, S3 at `s3`, outputs under `s3://outputs/<name>`,
    /// and `extra` variables (which win).
    pub fn start(name: &str, broker_env: &[(String, String)], s3: &S3Server, extra: &[(&str, &str)]) -> Self {
        let metrics_port = free_port();
        let dir = temp_dir(&format!("{name}-worker"));
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).expect("log file");
        let port = format!("127.0.0.1:{metrics_port}");
        let mut cmd = command(name, broker_env, s3, &[&[("RETOUCH_METRICS_ADDR", port.as_str())], extra].concat());
        cmd.arg("worker").stdout(Stdio::from(file.try_clone().expect("log"))).stderr(Stdio::from(file));
        let child = cmd.spawn().expect("start retouch worker");
        Self { child: Some(child), container: None, log, metrics_port, _dir: dir }
    }

    /// Starts `image` as a container named `<name>` with the worker's environment of
    /// [`Worker::start`] (the image's entrypoint and default command: `retouch worker --config
    /// /etc/retouch/worker.toml`), [`CHART_LIKE_DOCKER_RUN`] and the tiny checkpoint mounted at
    /// [`CONTAINER_MODEL_DIR`]. `docker_args` come before the image (mounts, more variables).
    pub fn start_container(
        image: &str,
        name: &str,
        broker_env: &[(String, String)],
        s3: &S3Server,
        extra: &[(&str, &str)],
        docker_args: &[&str],
    ) -> Self {
        let metrics_port = free_port();
        let dir = temp_dir(&format!("{name}-container"));
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).expect("log file");
        let port = format!("127.0.0.1:{metrics_port}");
        let env = worker_env(
            name,
            broker_env,
            s3,
            &[&[("RETOUCH_METRICS_ADDR", port.as_str()), ("RETOUCH_MODEL_SOURCE", CONTAINER_MODEL_DIR)], extra]
                .concat(),
        );
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--rm", "--name", name]).args(CHART_LIKE_DOCKER_RUN);
        cmd.arg(format!("--volume={}:{CONTAINER_MODEL_DIR}:ro", tiny_model().display()));
        for (key, value) in env.iter().filter(|(key, _)| key != "PATH" && key != "HOME") {
            cmd.arg("--env").arg(format!("{key}={value}"));
        }
        cmd.args(["--env", "HOME=/tmp"]).args(docker_args).arg(image);
        cmd.stdin(Stdio::null()).stdout(Stdio::from(file.try_clone().expect("log"))).stderr(Stdio::from(file));
        let child = cmd.spawn().expect("start docker run (is a Docker engine running?)");
        Self { child: Some(child), container: Some(name.to_string()), log, metrics_port, _dir: dir }
    }

    /// `docker exec` in the worker's container: `(exit code, stdout + stderr)`.
    ///
    /// # Panics
    /// When the worker does not run in a container.
    pub fn exec(&self, args: &[&str]) -> (i32, String) {
        let name = self.container.as_deref().expect("a container worker");
        let out = Command::new("docker").args(["exec", name]).args(args).output().expect("docker exec");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self) {
        let port = self.metrics_port;
        let log = self.log.clone();
        wait_for(&format!("the worker to be ready (log: {})", log.display()), Duration::from_secs(60), || {
            if let Some(status) = self.try_status() {
                panic!(
                    "the worker exited with {status} before becoming ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            http_get(port, "/readyz").filter(|(code, _)| *code == 200)
        });
    }

    /// `(status, body)` of a GET on the worker's HTTP port.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    /// The exit status, if it exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL (of the container, when it runs in one).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(name) = &self.container {
                let _ = Command::new("docker").args(["rm", "--force", name]).stdout(Stdio::null()).status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (to the container's PID 1, when it runs in one), then waits for the exit (up to
    /// `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let pid = child.id().to_string();
        match &self.container {
            Some(name) => {
                let _ = Command::new("docker").args(["kill", "--signal=TERM", name]).stdout(Stdio::null()).status();
            }
            None => {
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("the worker did not exit within {timeout:?} of SIGTERM; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of the sample `name` (labels included, as rendered) on the worker's `/metrics`,
    /// if it is there.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, metrics) = self.get("/metrics")?;
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// The log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text` (a worker logs a job's end after its result is
    /// confirmed, so a test that has the result may still be ahead of the line).
    ///
    /// # Panics
    /// After `timeout`, with the log.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(text) {
            assert!(Instant::now() < deadline, "the worker did not log {text:?} within {timeout:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `retouch` command with a worker's environment: the tiny model, S3 at `s3` with the test
/// keys, outputs under `s3://outputs/<name>`, this test's broker objects, then `extra`.
pub fn command(name: &str, broker_env: &[(String, String)], s3: &S3Server, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(retouch_bin());
    cmd.env_clear().envs(worker_env(name, broker_env, s3, extra));
    cmd
}

/// The whole environment of a test's `retouch` command (see [`command`]); a later entry wins.
pub fn worker_env(
    name: &str,
    broker_env: &[(String, String)],
    s3: &S3Server,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let own = [
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", std::env::temp_dir().display().to_string()),
        ("RUST_LOG", "info".into()),
        ("RETOUCH_MODEL_SOURCE", tiny_model().display().to_string()),
        ("RETOUCH_S3_ENDPOINT", s3.endpoint()),
        ("RETOUCH_S3_REGION", "us-east-1".into()),
        ("RETOUCH_S3_CONNECT_TIMEOUT", "1s".into()),
        ("RETOUCH_S3_OPERATION_TIMEOUT", "5s".into()),
        ("RETOUCH_S3_ATTEMPT_TIMEOUT", "5s".into()),
        ("RETOUCH_S3_MAX_ATTEMPTS", "2".into()),
        ("RETOUCH_ENGINE_OUTPUT_PREFIX", format!("s3://outputs/{name}")),
        ("RETOUCH_ENGINE_MAX_BATCH_WAIT", "300ms".into()),
        ("RETOUCH_ENGINE_RETRY_BACKOFF", "500ms".into()),
        ("RETOUCH_ENGINE_RETRY_BACKOFF_MAX", "2s".into()),
        ("RETOUCH_ENGINE_SHUTDOWN_TIMEOUT", "30s".into()),
        ("RETOUCH_ENGINE_WORKER_NAME", name.into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    let mut env: Vec<(String, String)> = own.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    env.extend(broker_env.iter().cloned());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // Later entries win, as with repeated `Command::env`: keep each key's last value only.
    let mut seen = std::collections::HashSet::new();
    let mut last_first: Vec<_> = env.into_iter().rev().filter(|(k, _)| seen.insert(k.clone())).collect();
    last_first.reverse();
    last_first
}

/// Longest a `retouch` command of a test may run before it counts as hung.
pub const CLI_DEADLINE: Duration = Duration::from_secs(600);

/// Runs a `retouch` command to completion: `(exit code, stdout, stderr)`. A command still
/// running after [`CLI_DEADLINE`] is killed and the test fails with what it printed, instead of
/// hanging the suite.
pub fn run_cli(mut cmd: Command, args: &[&str]) -> (i32, String, String) {
    let mut child =
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run retouch");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for retouch") {
            break status;
        }
        if started.elapsed() > CLI_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
            panic!("retouch {args:?} still ran after {CLI_DEADLINE:?}; killed.\n{out}{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default())
}

/// A minimal HTTP/1.0 GET: `(status, body)`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// A 64×64 test PNG (structured, so the model has something to do).
pub fn test_png(seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 64, |x, y| {
        let inside = (x as i32 - 32).pow(2) + (y as i32 - 28).pow(2) < 300;
        if inside {
            image::Rgb([230, 40u8.wrapping_add(seed), 40])
        } else {
            image::Rgb([(x * 4) as u8, (y * 3) as u8 ^ seed, 120])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// A private RabbitMQ node (own port, data dir and epmd), restartable without touching the
/// shared broker.
pub struct PrivateBroker {
    script: PathBuf,
    /// The node's data directory; removed after the node stops.
    dir: tempfile::TempDir,
    /// Its AMQP port.
    pub port: u16,
}

impl PrivateBroker {
    /// Starts a node.
    pub fn start(env: &Env, name: &str) -> Self {
        let broker =
            Self { script: env.rabbitmq_node.clone(), dir: temp_dir(&format!("{name}-rabbit")), port: free_port() };
        broker.run("start");
        broker
    }

    fn run(&self, action: &str) {
        let status = Command::new(&self.script)
            .args([action, &self.dir.path().display().to_string(), &self.port.to_string()])
            .status()
            .expect("rabbitmq-node.sh");
        assert!(status.success(), "rabbitmq-node.sh {action} failed");
    }

    /// The AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops then starts the node; durable queues and messages survive.
    pub fn restart(&self) {
        self.run("restart");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["stop", &self.dir.path().display().to_string(), &self.port.to_string()])
            .status();
    }
}
