//! [`AmqpDelivery`]: one received job and its settlement (implements
//! [`retouch_core::queue::Delivery`]).
//!
//! | Settlement | AMQP | Attempt spent? |
//! |---|---|---|
//! | `ack` | `basic.ack` | — |
//! | `retry(delay)` | wait `delay` holding the message, then `basic.reject(requeue=true)` | yes (all versions; on 4.3+ only reject counts, not nack) |
//! | `release` | `basic.nack(requeue=true)` | ≤ 4.2: yes; 4.3+: no |
//! | `dead_letter` | publish body + properties + reason headers to the dead-letter exchange ([`crate::confirm`]: confirmed, mandatory, unroutable is a failure), then `basic.ack`; fallback `basic.reject(requeue=false)` | — |
//!
//! Settlements go to the delivery's own channel. When that channel is gone (connection
//! lost, consumer timeout, reconnected since), lapin answers `Ok(false)`: the broker has
//! already requeued the job and will redeliver it, so that is [`QueueError::Lost`], counted
//! in `lost_acks`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use retouch_core::error::JobError;
use retouch_core::job::Priority;
use retouch_core::queue::{Delivery, DeliveryInfo, QueueCounters, QueueError};
use tracing::{debug, error, warn};

use crate::confirm::{self, Message, PublishError};
use crate::settings::AmqpSettings;
use crate::topology::short;

/// Header carrying the reason's [`ErrorKind`](retouch_core::error::ErrorKind) name.
pub const HEADER_ERROR_KIND: &str = "x-retouch-error-kind";
/// Header carrying the reason's message.
pub const HEADER_ERROR_MESSAGE: &str = "x-retouch-error-message";
/// Header carrying the attempt (from 1) that gave up.
pub const HEADER_ATTEMPT: &str = "x-retouch-attempt";
/// Header carrying when the job was dead-lettered (RFC 3339, UTC).
pub const HEADER_DEAD_LETTERED_AT: &str = "x-retouch-dead-lettered-at";
/// Header saying whether the error was transient (a re-drive may succeed).
pub const HEADER_ERROR_RETRYABLE: &str = "x-retouch-error-retryable";
/// Header naming the queue the job was consumed from.
pub const HEADER_QUEUE: &str = "x-retouch-queue";

/// Longest error message carried in a header (headers share the frame with the properties).
const MAX_HEADER_MESSAGE: usize = 4096;

/// A job received from the jobs queue. Settle it exactly once; dropping it unsettled leaves
/// the message unacknowledged until its channel closes (then the broker requeues it).
pub struct AmqpDelivery {
    inner: lapin::message::Delivery,
    info: DeliveryInfo,
    /// The consuming channel: settlements must use it, and holding it keeps the connection
    /// open for deliveries still in flight after the source closed or reconnected.
    _channel: Channel,
    /// The session's publisher-confirm channel, for dead letters.
    confirm: Channel,
    /// The queue it came from.
    from: Origin,
    settings: Arc<AmqpSettings>,
    counters: Arc<QueueCounters>,
}

impl std::fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDelivery")
            .field("delivery_tag", &self.inner.delivery_tag)
            .field("redelivered", &self.inner.redelivered)
            .field("info", &self.info)
            .field("body_bytes", &self.inner.data.len())
            .finish_non_exhaustive()
    }
}

/// The queue a delivery came from.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// Its name (for the dead letter's `x-retouch-queue`).
    pub(crate) queue: String,
    /// The priority of its jobs.
    pub(crate) priority: Priority,
}

impl AmqpDelivery {
    pub(crate) fn new(
        inner: lapin::message::Delivery,
        channel: Channel,
        confirm: Channel,
        from: Origin,
        settings: Arc<AmqpSettings>,
        counters: Arc<QueueCounters>,
    ) -> Self {
        let mut info = delivery_info(&inner.properties, settings.delivery_limit);
        info.priority = from.priority;
        Self { inner, info, _channel: channel, confirm, from, settings, counters }
    }

    /// The AMQP properties as received (headers included).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// Whether the broker flagged this as a redelivery.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Whether a settlement can still reach the broker: `false` once the delivery's channel
    /// is gone (then any settlement is [`QueueError::Lost`]) or after settling.
    pub fn is_settleable(&self) -> bool {
        self.inner.acker.usable()
    }

    fn id(&self) -> &str {
        self.info.message_id.as_deref().unwrap_or("<no message_id>")
    }

    /// Maps lapin's answer to a settlement: `Ok(false)` (channel closed or reconnected since)
    /// and errors are lost settlements the broker will redeliver.
    fn settled(&self, what: &str, result: lapin::Result<bool>) -> Result<(), QueueError> {
        let why = match result {
            Ok(true) => return Ok(()),
            Ok(false) => "the delivery's channel is gone (closed, timed out or reconnected since)".to_owned(),
            Err(e) => e.to_string(),
        };
        self.counters.lost_acks.fetch_add(1, Ordering::Relaxed);
        warn!(job = self.id(), settlement = what, reason = %why, "settlement lost; the broker will redeliver the job");
        Err(QueueError::Lost(format!("{what} of job {}: {why}", self.id())))
    }

    /// The reason headers added to a dead letter, on top of the original headers (minus the
    /// broker's `x-delivery-count`, which would otherwise make a re-driven job look spent).
    fn dead_letter_headers(&self, error: &JobError) -> FieldTable {
        let mut headers = FieldTable::default();
        if let Some(original) = self.inner.properties.headers() {
            for (k, v) in original {
                if k.as_str() != "x-delivery-count" {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let message = truncate(&error.message, MAX_HEADER_MESSAGE);
        headers.insert(HEADER_ERROR_KIND.into(), AMQPValue::LongString(error.kind.as_str().into()));
        headers.insert(HEADER_ERROR_MESSAGE.into(), AMQPValue::LongString(message.into()));
        headers.insert(HEADER_ERROR_RETRYABLE.into(), AMQPValue::Boolean(error.retryable));
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(self.info.attempt)));
        headers.insert(HEADER_DEAD_LETTERED_AT.into(), AMQPValue::LongString(retouch_core::time::now_rfc3339().into()));
        headers.insert(HEADER_QUEUE.into(), AMQPValue::LongString(self.from.queue.as_str().into()));
        headers
    }

    /// Publishes the dead letter and waits for its confirm; `Err` says why it is not safe.
    async fn publish_dead_letter(&self, error: &JobError) -> Result<(), PublishError> {
        let message = Message {
            exchange: short(&self.settings.dead_letter_exchange),
            routing_key: self.inner.routing_key.clone(),
            body: &self.inner.data,
            properties: self
                .inner
                .properties
                .clone()
                .with_headers(self.dead_letter_headers(error))
                .with_delivery_mode(2),
        };
        confirm::publish(&self.confirm, message, self.settings.publish_timeout).await
    }
}

impl Delivery for AmqpDelivery {
    fn body(&self) -> &[u8] {
        &self.inner.data
    }

    fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    async fn ack(self) -> Result<(), QueueError> {
        let r = self.inner.acker.ack(BasicAckOptions::default()).await;
        self.settled("ack", r)
    }

    async fn retry(self, delay: Duration) -> Result<(), QueueError> {
        // Holding the message keeps its prefetch slot busy and its consumer-timeout clock
        // running; the engine keeps delays short (a per-delay retry queue would be the
        // alternative, at the cost of a queue per tier).
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // reject, not nack: on RabbitMQ 4.3+ only reject spends an attempt.
        let r = self.inner.acker.reject(BasicRejectOptions { requeue: true }).await;
        debug!(job = self.id(), attempt = self.info.attempt, "rejected for retry");
        self.settled("retry", r)
    }

    async fn release(self) -> Result<(), QueueError> {
        let r = self.inner.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
        self.settled("release", r)
    }

    async fn dead_letter(self, error: &JobError) -> Result<(), QueueError> {
        match self.publish_dead_letter(error).await {
            Ok(()) => {
                let r = self.inner.acker.ack(BasicAckOptions::default()).await;
                // A lost ack here means a redelivery and, eventually, a second dead letter:
                // at-least-once, like everything else.
                self.settled("ack after dead letter", r)
            }
            Err(why) => {
                error!(job = self.id(), reason = %why, "dead letter not confirmed; rejecting to the queue's own dead-letter exchange");
                let r = self.inner.acker.reject(BasicRejectOptions { requeue: false }).await;
                let fallback = match self.settled("reject(requeue=false)", r) {
                    Ok(()) => {
                        "rejected to the queue's own dead-letter exchange instead (without reason headers)".to_owned()
                    }
                    Err(e) => format!("and the fallback failed: {e}"),
                };
                Err(QueueError::Unconfirmed(format!(
                    "dead letter of job {} to exchange {:?}: {why}; {fallback}",
                    self.id(),
                    self.settings.dead_letter_exchange
                )))
            }
        }
    }
}

/// Reads `x-delivery-count` as any integer type (3.10.8 sends a 64-bit long, and omits it on
/// a first `basic.consume` delivery; absent counts as 0).
pub(crate) fn delivery_count(headers: Option<&FieldTable>) -> u64 {
    let Some(value) = headers.and_then(|h| h.inner().get("x-delivery-count")) else {
        return 0;
    };
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Timestamp(v) => (*v).into(),
        other => {
            warn!(value = ?other, "x-delivery-count is not an integer; treating it as 0");
            0
        }
    };
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

/// Properties and attempt accounting of a delivery.
pub(crate) fn delivery_info(props: &BasicProperties, delivery_limit: u32) -> DeliveryInfo {
    let count = delivery_count(props.headers().as_ref());
    DeliveryInfo {
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: props.reply_to().as_ref().filter(|s| !s.as_str().is_empty()).map(|s| s.to_string()),
        published_at: props.timestamp().map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
        attempt: u32::try_from(count.saturating_add(1)).unwrap_or(u32::MAX),
        last_attempt: count >= u64::from(delivery_limit),
        priority: Priority::Normal,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props_with_count(v: Option<AMQPValue>) -> BasicProperties {
        let mut h = FieldTable::default();
        if let Some(v) = v {
            h.insert("x-delivery-count".into(), v);
        }
        BasicProperties::default()
            .with_headers(h)
            .with_message_id("job-1".into())
            .with_reply_to("replies".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1_700_000_000)
    }

    #[test]
    fn attempts_come_from_any_integer_delivery_count() {
        let i = delivery_info(&props_with_count(None), 2);
        assert_eq!((i.attempt, i.last_attempt), (1, false));
        assert_eq!(i.message_id.as_deref(), Some("job-1"));
        assert_eq!(i.reply_to.as_deref(), Some("replies"));
        assert_eq!(i.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(i.published_at, Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        for v in [
            AMQPValue::LongLongInt(2),
            AMQPValue::LongInt(2),
            AMQPValue::ShortShortUInt(2),
            AMQPValue::LongUInt(2),
            AMQPValue::ShortInt(2),
        ] {
            let i = delivery_info(&props_with_count(Some(v.clone())), 2);
            assert_eq!((i.attempt, i.last_attempt), (3, true), "{v:?}");
        }
        let i = delivery_info(&props_with_count(Some(AMQPValue::LongLongInt(1))), 2);
        assert_eq!((i.attempt, i.last_attempt), (2, false));
        let i = delivery_info(&props_with_count(Some(AMQPValue::LongLongInt(-3))), 2);
        assert_eq!(i.attempt, 1);
        let i = delivery_info(&props_with_count(Some(AMQPValue::LongString("7".into()))), 2);
        assert_eq!(i.attempt, 1);
        let i = delivery_info(&BasicProperties::default(), 5);
        assert_eq!(i, DeliveryInfo { attempt: 1, ..Default::default() });
    }
}
