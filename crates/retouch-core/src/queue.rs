//! The broker seam: where jobs come from, how each is settled, and where results go (RabbitMQ
//! in the fleet, an in-process queue in `retouch batch`).
//!
//! Settlement is explicit and happens once per delivery (the methods take `self`): `ack` after
//! the output and the result are stored, `retry` for transient failures (spends an attempt),
//! `release` for work never started at shutdown (does not spend one, where the broker allows),
//! `dead_letter` for permanent failures (the job keeps its body; the reason travels with it).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, SystemTime};

use crate::error::JobError;
use crate::events::JobEvent;
use crate::job::{JobResult, Priority};

/// What the engine needs to know about a delivery besides its body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// AMQP `message_id` (defaults to the job id).
    pub message_id: Option<String>,
    /// AMQP `correlation_id`, echoed on the reply.
    pub correlation_id: Option<String>,
    /// AMQP `reply_to`: a queue that also receives the result.
    pub reply_to: Option<String>,
    /// AMQP `timestamp`: when the job was published (for queue-wait timing).
    pub published_at: Option<SystemTime>,
    /// This delivery's attempt number, from 1.
    pub attempt: u32,
    /// No retry will follow: a failure now is final (failure result + dead letter).
    pub last_attempt: bool,
    /// The queue's class: deliveries of the high-priority queue are `High`.
    pub priority: Priority,
}

/// Why a broker operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The settlement could not reach the broker (channel or connection gone). The broker
    /// will redeliver the job; its output exists, so the redelivery is a duplicate-skip.
    #[error("settlement lost (the broker will redeliver): {0}")]
    Lost(String),
    /// A result or dead letter was not confirmed, or was returned as unroutable.
    #[error("publish not confirmed: {0}")]
    Unconfirmed(String),
    /// Anything else.
    #[error("broker: {0}")]
    Broker(String),
}

/// One received job.
pub trait Delivery: Send + 'static {
    /// The raw body (JSON for the protocol).
    fn body(&self) -> &[u8];

    /// Properties and attempt accounting.
    fn info(&self) -> &DeliveryInfo;

    /// Removes the job from the queue: it is done.
    fn ack(self) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Returns the job to the queue after `delay`, spending one attempt.
    fn retry(self, delay: Duration) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Returns a job whose processing never started (shutdown), without spending an attempt
    /// where the broker allows it.
    fn release(self) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Moves the job to the dead letters with `error` as the reason, then removes it.
    fn dead_letter(self, error: &JobError) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// A stream of deliveries.
pub trait JobSource: Send + 'static {
    /// The delivery type.
    type Delivery: Delivery;

    /// The next delivery, or `None` once the source is closed (or, for a finite source,
    /// exhausted). Reconnects internally; errors are only those it cannot recover from.
    fn next(&mut self) -> impl Future<Output = Result<Option<Self::Delivery>, QueueError>> + Send;

    /// Stops new deliveries; those already received stay settleable.
    fn close(&mut self) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// Where results go.
pub trait ResultSink: Send + Sync + 'static {
    /// Publishes `result` (to the results exchange, to `info.reply_to` with its correlation id
    /// when set, and, when the job asked for a `webhook`, to the durable webhook queue the
    /// relay delivers from); returns once every copy is confirmed.
    fn publish(
        &self,
        result: &JobResult,
        info: &DeliveryInfo,
        webhook: Option<&str>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Publishes a progress event (best effort: not confirmed, may be dropped). The default
    /// drops it (sinks without a live audience, such as `retouch batch`'s report).
    fn publish_event(
        &self,
        event: &JobEvent,
        reply_to: Option<&str>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let _ = (event, reply_to);
        std::future::ready(Ok(()))
    }
}

/// Broker health and incident counters, shared between a source and the metrics endpoint.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// The consumer is connected and subscribed.
    pub connected: AtomicBool,
    /// Connections re-established after a loss.
    pub reconnects: AtomicU64,
    /// Acks (or other settlements) that could not reach the broker.
    pub lost_acks: AtomicU64,
    /// Results the broker returned as unroutable (no queue bound).
    pub unroutable_results: AtomicU64,
}
