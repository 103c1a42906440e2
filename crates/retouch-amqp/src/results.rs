//! [`ResultsConsumer`]: a campaign's results queue as a stream of [`ResultMessage`]s, for
//! `retouch watch` (opened with [`Admin::consume_results`](crate::Admin::consume_results)).
//!
//! Manual acknowledgements: the caller stores a result before it [`ack`](ResultMessage::ack)s
//! it, so stopping at any point repeats results, never loses one. Unacknowledged results go
//! back to the queue when the consumer's connection closes.

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use retouch_core::queue::QueueError;

use crate::topology::short;

/// A subscription to a results queue. End it with [`cancel`](Self::cancel): dropping it
/// cancels the subscription and closes its channel at the same time, which lapin 4.12 can
/// answer with a connection error (an "unexpected cancel-ok") that breaks the connection's
/// other channels.
pub struct ResultsConsumer {
    /// The channel the subscription lives on; results must be acknowledged on it.
    channel: Channel,
    /// The subscription.
    consumer: Consumer,
    /// Its consumer tag, for `basic.cancel`.
    tag: ShortString,
    /// The queue, for messages.
    queue: String,
}

impl std::fmt::Debug for ResultsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultsConsumer").field("queue", &self.queue).finish_non_exhaustive()
    }
}

/// One result as received; acknowledge it once it is stored.
pub struct ResultMessage {
    /// lapin's delivery: the body and the acker.
    inner: lapin::message::Delivery,
}

impl std::fmt::Debug for ResultMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultMessage")
            .field("delivery_tag", &self.inner.delivery_tag)
            .field("body_bytes", &self.inner.data.len())
            .finish_non_exhaustive()
    }
}

impl ResultsConsumer {
    /// `basic.qos(prefetch)` and `basic.consume` (manual acks) of `queue` on `channel`.
    pub(crate) async fn subscribe(
        channel: Channel,
        queue: &str,
        prefetch: u16,
        connection_name: &str,
    ) -> Result<Self, QueueError> {
        let broker = |what: &str, e: lapin::Error| QueueError::Broker(format!("{what} {queue}: {e}"));
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| broker("basic.qos before consuming", e))?;
        let tag = ShortString::from(format!("{}/results-{:08x}", short(connection_name), rand::random::<u32>()));
        let consumer = channel
            .basic_consume(short(queue), tag.clone(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|e| broker("consuming", e))?;
        Ok(Self { channel, consumer, tag, queue: queue.to_owned() })
    }

    /// Ends the subscription in order: `basic.cancel` (and its `cancel-ok`), then the channel's
    /// close. Results received but not acknowledged go back to the queue.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the broker does not answer the cancel or the close.
    pub async fn cancel(self) -> Result<(), QueueError> {
        let broker = |what: &str, e: lapin::Error| QueueError::Broker(format!("{what} of {}: {e}", self.queue));
        if self.channel.status().connected() {
            self.channel
                .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
                .await
                .map_err(|e| broker("cancelling the consumer", e))?;
            self.channel.close(200, "done".into()).await.map_err(|e| broker("closing the channel", e))?;
        }
        Ok(())
    }

    /// The next result; `None` when the broker ended the subscription (queue deleted,
    /// consumer cancelled). Cancel-safe: race it against a deadline or a signal.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the channel or the connection failed.
    pub async fn next(&mut self) -> Result<Option<ResultMessage>, QueueError> {
        match self.consumer.next().await {
            Some(Ok(inner)) => Ok(Some(ResultMessage { inner })),
            Some(Err(e)) => Err(QueueError::Broker(format!("reading results from {}: {e}", self.queue))),
            None => Ok(None),
        }
    }
}

impl ResultMessage {
    /// The body as published (a JSON [`JobResult`](retouch_core::job::JobResult) for the
    /// protocol).
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// Removes the result from the queue.
    ///
    /// # Errors
    /// [`QueueError::Lost`] when the channel is gone: the broker requeued the result and will
    /// deliver it again.
    pub async fn ack(self) -> Result<(), QueueError> {
        match self.inner.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(QueueError::Lost("ack of a result: the channel is gone".into())),
            Err(e) => Err(QueueError::Lost(format!("ack of a result: {e}"))),
        }
    }
}
