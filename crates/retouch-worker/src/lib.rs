//! Retouch's runtime as a library: everything `retouch worker` and `retouch batch` run,
//! generic over the seams of `retouch-core` so the same engine serves RabbitMQ + S3 in the
//! fleet and an in-process queue + the filesystem on one machine.
//!
//! * [`engine`]: the job's life — receive, fetch, decode, batch, infer, encode, upload,
//!   publish, ack — with bounded queues, retries, dead letters and graceful shutdown.
//! * `failure` (private): the one error classifier — every failure a job meets becomes a
//!   protocol error kind with its retry class there.
//! * [`cancel`]: the cancel requests in force, asked at every stage.
//! * [`batcher`]: grouping compatible jobs into model calls.
//! * [`backend`]: the model thread that owns the editor.
//! * [`metrics`]: every Prometheus metric; [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! * [`local`]: the in-process queue, filesystem store and JSONL report of `retouch batch`.

pub mod backend;
pub mod batcher;
pub mod cancel;
pub mod engine;
mod failure;
pub mod http;
pub mod local;
pub mod metrics;
