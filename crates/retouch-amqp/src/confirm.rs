//! Confirmed publishing: the one routine every message of this crate goes out through —
//! results, jobs, dead letters, re-driven dead letters (and the end-to-end harness, through
//! [`AmqpPublisher`](crate::AmqpPublisher)).
//!
//! Every publish is `mandatory` on a channel in confirm mode, and only a broker `basic.ack`
//! **without** a `basic.return` counts as delivered. The other ends are errors that say what
//! happened ([`PublishError`]): returned as unroutable (no queue bound for it), negatively
//! confirmed, no confirm within the caller's timeout, or the channel failing underneath
//! (worth one retry on a new channel). Callers decide what an unroutable message means: a
//! result nobody listens to is counted, a job or a dead letter that no queue receives is lost
//! and therefore an error.
//!
//! [`send`] and [`Pending::confirmed`] split a publish in two so that bulk publishing can keep
//! many confirms in flight; [`publish`] is both under one timeout.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

/// Why a message was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker returned it (`basic.return`, usually 312 `NO_ROUTE`): no queue is bound to
    /// receive it.
    #[error("returned by the broker ({code} {text}): no queue is bound to receive it")]
    Unroutable {
        /// The reply code (312 for `NO_ROUTE`).
        code: u16,
        /// The broker's words.
        text: String,
    },
    /// The broker answered `basic.nack` (it could not take responsibility for the message).
    #[error("negatively confirmed by the broker")]
    Nacked,
    /// No confirm arrived within the caller's timeout.
    #[error("not confirmed within {0:?}")]
    Timeout(Duration),
    /// The channel or its connection failed before the confirm: worth one retry on a new
    /// channel (see [`is_transport`](Self::is_transport)).
    #[error("the channel failed before the confirm: {0}")]
    Transport(#[source] lapin::Error),
    /// The channel was never put in confirm mode: a bug in this crate.
    #[error("the channel is not in confirm mode (a bug)")]
    NotInConfirmMode,
}

impl PublishError {
    /// Whether the channel failed underneath, so that a new channel might succeed.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Transport(_))
    }
}

/// One message to publish (always `mandatory`).
#[derive(Clone, Debug)]
pub struct Message<'a> {
    /// The exchange (`""`: the default exchange, routing straight to the queue named by the key).
    pub exchange: ShortString,
    /// The routing key.
    pub routing_key: ShortString,
    /// The body.
    pub body: &'a [u8],
    /// The AMQP properties, as they should arrive.
    pub properties: BasicProperties,
}

/// A message sent and awaiting its confirm.
#[must_use = "a publish is only delivered once its confirm says so"]
pub struct Pending(PublisherConfirm);

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

/// Sends `message` (`mandatory`) on `channel`, which must be in confirm mode, without waiting
/// for the confirm.
///
/// # Errors
/// [`PublishError::Transport`] when the channel cannot take the frame.
pub async fn send(channel: &Channel, message: Message<'_>) -> Result<Pending, PublishError> {
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    channel
        .basic_publish(message.exchange, message.routing_key, options, message.body, message.properties)
        .await
        .map(Pending)
        .map_err(PublishError::Transport)
}

impl Pending {
    /// Waits for the broker's answer; `Ok` only for an ack without a return.
    ///
    /// # Errors
    /// [`PublishError::Unroutable`], [`PublishError::Nacked`], [`PublishError::Transport`]
    /// (the channel closed first), [`PublishError::NotInConfirmMode`]. Bound the wait with
    /// [`wait`](Self::wait) or [`publish`].
    pub async fn confirmed(self) -> Result<(), PublishError> {
        match self.0.await.map_err(PublishError::Transport)? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                Err(PublishError::Unroutable { code: returned.reply_code, text: returned.reply_text.to_string() })
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::NotInConfirmMode),
        }
    }

    /// [`confirmed`](Self::confirmed) within `timeout`.
    ///
    /// # Errors
    /// As [`confirmed`](Self::confirmed), or [`PublishError::Timeout`].
    pub async fn wait(self, timeout: Duration) -> Result<(), PublishError> {
        tokio::time::timeout(timeout, self.confirmed()).await.unwrap_or(Err(PublishError::Timeout(timeout)))
    }
}

/// Sends `message` **without** `mandatory` and without waiting for its confirm: the best-effort
/// publish of progress events, which may be dropped (nobody bound, a broker that pushes back)
/// and must never hold up the caller for long.
///
/// # Errors
/// [`PublishError::Transport`] when the channel cannot take the frame.
pub async fn send_best_effort(channel: &Channel, message: Message<'_>) -> Result<(), PublishError> {
    channel
        .basic_publish(
            message.exchange,
            message.routing_key,
            BasicPublishOptions::default(),
            message.body,
            message.properties,
        )
        .await
        .map(drop)
        .map_err(PublishError::Transport)
}

/// Sends `message` and waits for its confirm, both within `timeout`.
///
/// # Errors
/// As [`send`] and [`Pending::confirmed`], or [`PublishError::Timeout`].
pub async fn publish(channel: &Channel, message: Message<'_>, timeout: Duration) -> Result<(), PublishError> {
    let attempt = async { send(channel, message).await?.confirmed().await };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(Err(PublishError::Timeout(timeout)))
}
