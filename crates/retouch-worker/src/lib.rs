//! Retouch's runtime as a library: everything `retouch worker` and `retouch batch` run,
//! generic over the seams of `retouch-core` so the same engine serves RabbitMQ + S3 in the
//! fleet and an in-process queue + the filesystem on one machine.
//!
//! * [`config`]: the worker's typed configuration (TOML + `RETOUCH_*` environment).
//! * [`engine`]: the job's life — receive, fetch, decode, batch, infer, encode, upload,
//!   publish, ack — with bounded queues, retries, dead letters and graceful shutdown.
//! * [`batcher`]: grouping compatible jobs into model calls.
//! * [`backend`]: the model thread that owns the editor.
//! * [`metrics`]: every Prometheus metric; [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! * [`local`]: the in-process queue, filesystem store and JSONL report of `retouch batch`.

pub mod backend;
pub mod batcher;
pub mod config;
pub mod engine;
pub mod http;
pub mod local;
pub mod metrics;
