//! [`WebhookQueue`]: the durable queue of webhook deliveries, consumed by the webhook relay.
//!
//! A result whose job asked for a webhook is published to this queue (confirmed) before the
//! job is acked ([`crate::publisher`]), with the URL in [`HEADER_WEBHOOK_URL`] and the
//! delivery's id as `message_id`; the relay holds a message while it retries the `POST` and
//! acks it once delivered, or moves it to the webhook dead-letter queue with the last HTTP
//! status when it gives up. A relay that dies mid-delivery leaves the message unacked: the
//! broker hands it to another relay (at-least-once; receivers deduplicate by `webhook-id`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Consumer};
use retouch_core::backoff::Backoff;
use retouch_core::queue::QueueError;
use tracing::{info, warn};

use crate::confirm::{self, Message};
use crate::publisher::HEADER_WEBHOOK_URL;
use crate::session::{OpenError, Session, Topology, reopen};
use crate::settings::AmqpSettings;
use crate::topology::short;

/// Header of a dead webhook delivery: the last HTTP status (absent when none came).
pub const HEADER_LAST_STATUS: &str = "x-retouch-webhook-last-status";
/// Header of a dead webhook delivery: why it was given up.
pub const HEADER_REASON: &str = "x-retouch-webhook-error";

/// The webhook queue as a stream of [`WebhookMessage`]s. Create it with
/// [`WebhookQueue::connect`].
pub struct WebhookQueue {
    /// Names, URL, reconnect backoff.
    settings: Arc<AmqpSettings>,
    /// Deliveries held at once (the relay's concurrency).
    prefetch: u16,
    /// The current subscription; `None` after a loss until [`next`](Self::next) reconnects.
    reading: Option<Reading>,
    /// Reconnect delays.
    backoff: Backoff,
}

impl std::fmt::Debug for WebhookQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookQueue").field("queue", &self.settings.webhook_queue).finish_non_exhaustive()
    }
}

/// A session with a consumer on the webhook queue.
struct Reading {
    /// The connection and its confirm channel (for dead letters).
    session: Session,
    /// The consuming channel; settlements go to it.
    channel: Channel,
    /// The subscription.
    consumer: Consumer,
}

/// One webhook delivery to make. Settle it once: [`ack`](Self::ack),
/// [`dead_letter`](Self::dead_letter) or [`release`](Self::release).
pub struct WebhookMessage {
    /// lapin's delivery.
    inner: lapin::message::Delivery,
    /// The consuming channel, kept for the settlement.
    _channel: Channel,
    /// The session's confirm channel, for the dead letter.
    confirm: Channel,
    /// Names and the publish timeout.
    settings: Arc<AmqpSettings>,
}

impl std::fmt::Debug for WebhookMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookMessage").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl WebhookQueue {
    /// Connects, declares (or checks) the topology and subscribes with `prefetch` deliveries
    /// in flight.
    ///
    /// # Errors
    /// [`QueueError::Broker`] for invalid settings, an unreachable broker or a topology that
    /// does not match.
    pub async fn connect(settings: AmqpSettings, prefetch: u16) -> Result<Self, QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let settings = Arc::new(settings);
        let prefetch = prefetch.clamp(1, 2000);
        let reading = Reading::open(&settings, prefetch).await?;
        info!(queue = %settings.webhook_queue, prefetch, "relaying webhooks");
        Ok(Self { backoff: settings.reconnect_backoff(), settings, prefetch, reading: Some(reading) })
    }

    /// The next delivery to make; reconnects after a loss. Cancel-safe.
    ///
    /// # Errors
    /// [`QueueError::Broker`] only for a topology that reconnecting cannot fix.
    pub async fn next(&mut self) -> Result<WebhookMessage, QueueError> {
        loop {
            let Some(reading) = self.reading.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            match reading.consumer.next().await {
                Some(Ok(d)) if d.acker.usable() => {
                    return Ok(WebhookMessage {
                        inner: d,
                        _channel: reading.channel.clone(),
                        confirm: reading.session.confirm.clone(),
                        settings: self.settings.clone(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "webhook queue consumer lost; reconnecting");
                    self.reading = None;
                }
                None => {
                    warn!("the broker cancelled the webhook queue consumer; reconnecting");
                    self.reading = None;
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), QueueError> {
        let (settings, prefetch) = (&self.settings, self.prefetch);
        let reading = reopen(&mut self.backoff, "webhook queue", || Reading::open(settings, prefetch)).await?;
        self.reading = Some(reading);
        info!(queue = %self.settings.webhook_queue, "webhook queue consumer reconnected");
        Ok(())
    }
}

impl Reading {
    async fn open(settings: &AmqpSettings, prefetch: u16) -> Result<Self, OpenError> {
        let session = Session::open(settings, "webhooks", Topology::Declare).await?;
        let (channel, consumer) =
            session.subscribe(settings, &settings.webhook_queue, prefetch, "webhooks", FieldTable::default()).await?;
        Ok(Self { session, channel, consumer })
    }
}

impl WebhookMessage {
    /// The result JSON to deliver.
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// The URL to POST to, as the job gave it.
    pub fn url(&self) -> Option<String> {
        match self.inner.properties.headers().as_ref()?.inner().get(HEADER_WEBHOOK_URL)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// The delivery's id (`webhook-id`): the same for every copy of one result.
    pub fn id(&self) -> String {
        self.inner.properties.message_id().as_ref().map(ShortString::to_string).unwrap_or_default()
    }

    /// When the result was published: the retry window counts from here.
    pub fn published_at(&self) -> SystemTime {
        self.inner.properties.timestamp().map_or_else(SystemTime::now, |s| UNIX_EPOCH + Duration::from_secs(s))
    }

    /// Delivered: removes it.
    ///
    /// # Errors
    /// [`QueueError::Lost`] when the channel is gone (the delivery will be made again).
    pub async fn ack(self) -> Result<(), QueueError> {
        settled(self.inner.acker.ack(BasicAckOptions::default()).await, "ack of a webhook delivery")
    }

    /// Not delivered now (shutdown): back to the queue for another relay.
    ///
    /// # Errors
    /// [`QueueError::Lost`] when the channel is gone (the broker requeued it anyway).
    pub async fn release(self) -> Result<(), QueueError> {
        let r = self.inner.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
        settled(r, "release of a webhook delivery")
    }

    /// Given up: publishes it (confirmed) to the webhook dead-letter queue with the last HTTP
    /// status and the reason, then removes it.
    ///
    /// # Errors
    /// [`QueueError::Unconfirmed`] when the dead letter is not confirmed (the message stays
    /// and is redelivered), [`QueueError::Lost`] when the final ack is lost.
    pub async fn dead_letter(self, last_status: Option<u16>, reason: &str) -> Result<(), QueueError> {
        let mut headers = self.inner.properties.headers().clone().unwrap_or_default();
        if let Some(status) = last_status {
            headers.insert(HEADER_LAST_STATUS.into(), AMQPValue::LongInt(i32::from(status)));
        }
        headers.insert(HEADER_REASON.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            "x-retouch-dead-lettered-at".into(),
            AMQPValue::LongString(retouch_core::time::now_rfc3339().into()),
        );
        let message = Message {
            exchange: ShortString::from(""),
            routing_key: short(&self.settings.webhook_dead_queue),
            body: &self.inner.data,
            properties: self.inner.properties.clone().with_headers(headers),
        };
        confirm::publish(&self.confirm, message, self.settings.publish_timeout).await.map_err(|e| {
            QueueError::Unconfirmed(format!("webhook dead letter to {:?}: {e}", self.settings.webhook_dead_queue))
        })?;
        settled(self.inner.acker.ack(BasicAckOptions::default()).await, "ack after a webhook dead letter")
    }
}

fn settled(result: lapin::Result<bool>, what: &str) -> Result<(), QueueError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Lost(format!("{what}: the channel is gone"))),
        Err(e) => Err(QueueError::Lost(format!("{what}: {e}"))),
    }
}
