//! [`CancelFeed`]: the cancel stream as a sequence of [`CancelRequest`]s, read from its start.
//!
//! Cancel requests are published to a fanout exchange bound to a RabbitMQ **stream** that keeps
//! them for `cancel_retention` (`x-max-age`). Every reader starts at the stream's first
//! message, so a worker that starts after a cancel was sent still sees it.
//! [`CancelFeed::open`] returns once the reader has caught up: it publishes a marker of its own
//! (confirmed, so the stream holds it after everything confirmed before it) and reads until the
//! marker comes back — every cancel published before the worker started is then known, before
//! the worker takes its first job. After that, [`CancelFeed::next`] follows the stream live,
//! reconnecting after a loss from the offset after the last one read.
//!
//! A body that is not a valid cancel request is logged and skipped: a stream keeps it anyway,
//! and it must not stop the cancels behind it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use retouch_core::backoff::Backoff;
use retouch_core::events::CancelRequest;
use retouch_core::queue::QueueError;
use tracing::{info, warn};

use crate::confirm::{self, Message};
use crate::session::{OpenError, Session, Topology, reopen};
use crate::settings::AmqpSettings;
use crate::topology::short;

/// AMQP `type` of the catch-up markers readers publish to the stream (skipped by every reader).
pub const MARKER_TYPE: &str = "retouch.cancel-marker";

/// Stream messages in flight to the reader (streams need a prefetch for credit).
const STREAM_PREFETCH: u16 = 500;

/// One cancel request as read, with when it was published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedCancel {
    /// The request.
    pub request: CancelRequest,
    /// The message's AMQP timestamp (the reading time when it has none).
    pub published_at: SystemTime,
}

/// A reader of the cancel stream. Create it with [`CancelFeed::open`].
pub struct CancelFeed {
    /// Names, URL, retention, reconnect backoff.
    settings: AmqpSettings,
    /// The current subscription; `None` after a loss until [`next`](Self::next) reconnects.
    reading: Option<Reading>,
    /// The stream offset to resume from after a loss (the one after the last message read).
    resume_at: Option<i64>,
    /// Reconnect delays.
    backoff: Backoff,
}

impl std::fmt::Debug for CancelFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelFeed")
            .field("stream", &self.settings.cancel_stream)
            .field("resume_at", &self.resume_at)
            .finish_non_exhaustive()
    }
}

/// A session with a consumer on the stream.
struct Reading {
    /// The connection and its confirm channel (for the marker).
    session: Session,
    /// The consuming channel, kept open for the subscription's life.
    _channel: Channel,
    /// The subscription.
    consumer: Consumer,
}

/// One message of the stream, decoded.
enum Item {
    /// A cancel request.
    Cancel(ReceivedCancel),
    /// A catch-up marker, with its id.
    Marker(String),
    /// Something that is not a cancel request (already logged).
    Skipped,
}

impl CancelFeed {
    /// Connects, declares (or checks) the topology, subscribes from the stream's first
    /// message, and reads up to a marker of its own; returns the feed and every cancel request
    /// the stream holds.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the broker is unreachable, the topology does not match, or
    /// the marker does not come back within `publish_timeout` (plus the time to read what the
    /// stream holds).
    pub async fn open(settings: AmqpSettings) -> Result<(Self, Vec<ReceivedCancel>), QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let reading = Reading::open(&settings, AMQPValue::LongString("first".into())).await?;
        let mut feed =
            Self { backoff: settings.reconnect_backoff(), settings, reading: Some(reading), resume_at: None };
        let marker = format!("{}-{:016x}", feed.settings.connection_name, rand::random::<u64>());
        feed.publish_marker(&marker).await?;
        let mut held = Vec::new();
        let deadline = tokio::time::Instant::now() + feed.settings.publish_timeout;
        loop {
            let item = tokio::time::timeout_at(deadline, feed.read()).await.map_err(|_| {
                QueueError::Broker(format!(
                    "catching up with the cancel stream {:?}: the marker did not come back within {:?}",
                    feed.settings.cancel_stream, feed.settings.publish_timeout
                ))
            })??;
            match item {
                Item::Cancel(c) => held.push(c),
                Item::Marker(m) if m == marker => break,
                Item::Marker(_) | Item::Skipped => {}
            }
        }
        info!(stream = %feed.settings.cancel_stream, requests = held.len(), "cancel stream read up to now");
        Ok((feed, held))
    }

    /// The next cancel request; waits for one. Reconnects after a loss (resuming after the
    /// last message read). Cancel-safe.
    ///
    /// # Errors
    /// [`QueueError::Broker`] only for a topology that cannot be fixed by reconnecting.
    pub async fn next(&mut self) -> Result<ReceivedCancel, QueueError> {
        loop {
            match self.read().await {
                Ok(Item::Cancel(c)) => return Ok(c),
                Ok(Item::Marker(_) | Item::Skipped) => {}
                Err(e) => {
                    warn!(error = %e, stream = %self.settings.cancel_stream, "cancel stream lost; reconnecting");
                    self.reading = None;
                    self.reconnect().await?;
                }
            }
        }
    }

    /// Reads and acknowledges one message.
    async fn read(&mut self) -> Result<Item, QueueError> {
        let Some(reading) = self.reading.as_mut() else {
            return Err(QueueError::Lost("no subscription".into()));
        };
        let delivery = match reading.consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(QueueError::Lost(format!("reading the cancel stream: {e}"))),
            None => return Err(QueueError::Lost("the broker ended the cancel-stream subscription".into())),
        };
        if let Some(offset) = stream_offset(&delivery.properties) {
            self.resume_at = Some(offset + 1);
        }
        // Acks give the stream its credit; a lost one only means the message comes again.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        let props = &delivery.properties;
        if props.kind().as_ref().is_some_and(|k| k.as_str() == MARKER_TYPE) {
            return Ok(Item::Marker(props.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default()));
        }
        match CancelRequest::parse(&delivery.data) {
            Ok(request) => {
                let published_at =
                    props.timestamp().map_or_else(SystemTime::now, |secs| UNIX_EPOCH + Duration::from_secs(secs));
                Ok(Item::Cancel(ReceivedCancel { request, published_at }))
            }
            Err(e) => {
                warn!(error = %e.message, "skipping a message of the cancel stream that is not a cancel request");
                Ok(Item::Skipped)
            }
        }
    }

    /// Publishes a catch-up marker and waits for its confirm.
    async fn publish_marker(&self, marker: &str) -> Result<(), QueueError> {
        let Some(reading) = &self.reading else { return Err(QueueError::Lost("no session".into())) };
        let message = Message {
            exchange: short(&self.settings.cancel_exchange),
            routing_key: ShortString::from(""),
            body: b"{}",
            properties: BasicProperties::default()
                .with_delivery_mode(1)
                .with_message_id(short(marker))
                .with_type(ShortString::from(MARKER_TYPE)),
        };
        confirm::publish(&reading.session.confirm, message, self.settings.publish_timeout)
            .await
            .map_err(|e| QueueError::Unconfirmed(format!("cancel-stream marker: {e}")))
    }

    /// Subscribes again after the backoff, from the offset after the last message read.
    async fn reconnect(&mut self) -> Result<(), QueueError> {
        let offset = self.resume_at.map_or(AMQPValue::LongString("first".into()), AMQPValue::LongLongInt);
        let settings = &self.settings;
        let reading = reopen(&mut self.backoff, "cancel stream", || Reading::open(settings, offset.clone())).await?;
        self.reading = Some(reading);
        info!(stream = %self.settings.cancel_stream, resume_at = ?self.resume_at, "cancel stream reconnected");
        Ok(())
    }
}

impl Reading {
    /// A session with a stream consumer starting at `offset`.
    async fn open(settings: &AmqpSettings, offset: AMQPValue) -> Result<Self, OpenError> {
        let session = Session::open(settings, "cancels", Topology::Declare).await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), offset);
        let (channel, consumer) =
            session.subscribe(settings, &settings.cancel_stream, STREAM_PREFETCH, "cancels", args).await?;
        Ok(Self { session, _channel: channel, consumer })
    }
}

/// The `x-stream-offset` a stream delivery carries.
fn stream_offset(props: &BasicProperties) -> Option<i64> {
    match props.headers().as_ref()?.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}
