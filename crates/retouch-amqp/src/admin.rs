//! [`Admin`], operator tools on the broker: a campaign's own durable results queue (declared by
//! [`crate::topology::declare_campaign_queue`], consumed through [`ResultsConsumer`], deleted
//! when done: `retouch submit` and `retouch watch`) and reading or re-driving the dead letters
//! (`retouch dead-letters`).
//!
//! Dead letters are read with `basic.get` and held unacknowledged until the end of a pass, so
//! a pass sees every message that was in the queue when it began exactly once; messages that
//! are only listed (or do not match a re-drive filter) are returned with `nack(requeue)`.
//! Re-driven messages are published to the jobs exchange through [`crate::confirm`] (confirms,
//! `mandatory`, unroutable is a failure), and only then acknowledged on the dead-letter queue:
//! nothing is lost if the tool dies midway.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use retouch_core::job::EditJob;
use retouch_core::queue::QueueError;

use crate::confirm::{self, Message};
use crate::delivery::{HEADER_ATTEMPT, HEADER_DEAD_LETTERED_AT, HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE};
use crate::results::ResultsConsumer;
use crate::session::{Session, Topology};
use crate::settings::AmqpSettings;
use crate::topology::{declare_campaign_queue, short};

fn broker(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Broker(format!("{what}: {e}"))
}

/// A session for operator commands (it declares nothing on connect).
pub struct Admin {
    /// The connection and its confirm channel, used for everything here.
    session: Session,
    /// Names, `publish_timeout`.
    settings: AmqpSettings,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// A job read from the dead-letter queue.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The job as published (body kept byte for byte).
    pub body: Vec<u8>,
    /// `message_id`.
    pub message_id: Option<String>,
    /// The job id, when the body is a job.
    pub job_id: Option<String>,
    /// The campaign, when the body is a job with one.
    pub campaign_id: Option<String>,
    /// Why it died: the worker's error kind, or RabbitMQ's `x-death` reason
    /// (`delivery_limit`, `rejected`, `expired`, `maxlen`).
    pub reason: String,
    /// The worker's error message, if any.
    pub message: String,
    /// The final attempt, if recorded.
    pub attempt: Option<i64>,
    /// When it was dead-lettered (RFC 3339), if recorded.
    pub dead_lettered_at: Option<String>,
    properties: BasicProperties,
}

/// What to do with a dead letter during a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Leave it in the dead-letter queue.
    Keep,
    /// Publish it to the jobs exchange again and remove it from the dead-letter queue.
    Redrive,
}

/// Counts of a pass over the dead letters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Messages read.
    pub seen: usize,
    /// Messages re-published.
    pub redriven: usize,
}

fn header_text(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// RabbitMQ's first `x-death` reason (`x-first-death-reason`), e.g. `delivery_limit`.
fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    header_text(headers, "x-first-death-reason")
}

impl DeadLetter {
    /// `(campaign or "-", reason)`: how summaries group dead letters.
    pub fn group(&self) -> (String, String) {
        (self.campaign_id.clone().unwrap_or_else(|| "-".into()), self.reason.clone())
    }

    fn parse(body: Vec<u8>, properties: BasicProperties) -> Self {
        let headers = properties.headers().as_ref();
        let job: Option<EditJob> = serde_json::from_slice(&body).ok();
        let reason = header_text(headers, HEADER_ERROR_KIND)
            .or_else(|| death_reason(headers))
            .unwrap_or_else(|| "unknown".into());
        Self {
            message_id: properties.message_id().as_ref().map(|m| m.as_str().to_string()),
            job_id: job.as_ref().map(|j| j.job_id.clone()),
            campaign_id: job.and_then(|j| j.campaign_id),
            reason,
            message: header_text(headers, HEADER_ERROR_MESSAGE).unwrap_or_default(),
            attempt: header_int(headers, HEADER_ATTEMPT),
            dead_lettered_at: header_text(headers, HEADER_DEAD_LETTERED_AT),
            body,
            properties,
        }
    }

    /// The properties to publish a re-driven job with: the original ones, without the
    /// bookkeeping headers of the broker (`x-death`, `x-first-death-*`, `x-delivery-count`)
    /// and of the worker (`x-retouch-*`), so it starts afresh.
    fn redrive_properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(original) = self.properties.headers() {
            for (k, v) in original.inner() {
                let key = k.as_str();
                let bookkeeping = key.starts_with("x-death")
                    || key.starts_with("x-first-death")
                    || key.starts_with("x-last-death")
                    || key.starts_with("x-retouch-")
                    || key == "x-delivery-count";
                if !bookkeeping {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        self.properties.clone().with_headers(headers).with_delivery_mode(2)
    }
}

impl Admin {
    /// Connects (declaring nothing).
    ///
    /// # Errors
    /// [`QueueError::Broker`] for invalid settings or an unreachable broker.
    pub async fn connect(settings: AmqpSettings) -> Result<Self, QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let session = Session::open(&settings, "admin", Topology::Skip).await?;
        Ok(Self { session, settings })
    }

    fn channel(&self) -> &Channel {
        &self.session.confirm
    }

    /// Declares (idempotently) `campaign`'s results queue and returns its name; see
    /// [`declare_campaign_queue`].
    ///
    /// # Errors
    /// [`QueueError::Broker`] on broker errors or an existing queue with other arguments.
    pub async fn declare_campaign_queue(&self, campaign: &str) -> Result<String, QueueError> {
        // A channel of its own: a failed declaration closes its channel.
        let channel = self.session.channel("opening a channel").await?;
        let name = declare_campaign_queue(&channel, &self.settings, campaign)
            .await
            .map_err(|e| broker(&format!("declaring the results queue of campaign {campaign}"), e))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(name)
    }

    /// Consumes `queue` (a campaign's results queue) with up to `prefetch` unacknowledged
    /// results, on a channel of its own.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the channel, `basic.qos` or `basic.consume` fails (e.g. the
    /// queue does not exist).
    pub async fn consume_results(&self, queue: &str, prefetch: u16) -> Result<ResultsConsumer, QueueError> {
        let channel = self.session.channel("opening the results channel").await?;
        ResultsConsumer::subscribe(channel, queue, prefetch, &self.settings.connection_name).await
    }

    /// Follows `campaign`'s progress events: a private queue (exclusive, deleted with the
    /// connection) bound to `progress.<campaign>` on the results exchange, consumed like a
    /// results queue. Events published while nobody follows are not kept.
    ///
    /// # Errors
    /// [`QueueError::Broker`] on broker errors.
    pub async fn consume_progress(&self, campaign: &str, prefetch: u16) -> Result<ResultsConsumer, QueueError> {
        let channel = self.session.channel("opening the progress channel").await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = channel
            .queue_declare(ShortString::from(""), options, FieldTable::default())
            .await
            .map_err(|e| broker("declaring a progress queue", e))?;
        let name = queue.name().as_str().to_owned();
        channel
            .queue_bind(
                short(&name),
                short(&self.settings.results_exchange),
                short(&format!("progress.{campaign}")),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker("binding the progress queue", e))?;
        ResultsConsumer::subscribe(channel, &name, prefetch, &self.settings.connection_name).await
    }

    /// Deletes a queue (a finished campaign's results queue).
    ///
    /// # Errors
    /// [`QueueError::Broker`] on broker errors.
    pub async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        self.channel()
            .queue_delete(short(name), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| broker(&format!("deleting {name}"), e))
    }

    /// Messages ready in `queue` (passive declare, on a channel of its own: a missing queue
    /// closes the channel it was asked on).
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the queue does not exist.
    pub async fn ready(&self, queue: &str) -> Result<u32, QueueError> {
        let channel = self.session.channel("opening a channel").await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let ready = channel
            .queue_declare(short(queue), passive, FieldTable::default())
            .await
            .map(|q| q.message_count())
            .map_err(|e| broker(&format!("queue {queue}"), e))?;
        let _ = channel.close(200, "checked".into()).await;
        Ok(ready)
    }

    /// One pass over the dead letters present now: `decide` sees each (up to `limit`) and says
    /// whether to re-drive it. Kept messages go back to the dead-letter queue at the end.
    ///
    /// # Errors
    /// [`QueueError`] on broker failures; a re-drive that is not confirmed leaves its dead
    /// letter in place.
    pub async fn dead_letter_pass(
        &self,
        limit: Option<usize>,
        mut decide: impl FnMut(&DeadLetter) -> Disposition,
    ) -> Result<PassSummary, QueueError> {
        let queue = self.settings.dead_letter_queue.clone();
        let present = self.ready(&queue).await? as usize;
        let budget = limit.map_or(present, |l| l.min(present));
        let channel = self.channel();
        let mut summary = PassSummary::default();
        let mut kept = Vec::new();
        while summary.seen < budget {
            let Some(message) = channel
                .basic_get(short(&queue), BasicGetOptions { no_ack: false })
                .await
                .map_err(|e| broker("reading the dead letters", e))?
            else {
                break;
            };
            summary.seen += 1;
            let tag = message.delivery.delivery_tag;
            let letter = DeadLetter::parse(message.delivery.data.clone(), message.delivery.properties.clone());
            match decide(&letter) {
                Disposition::Keep => kept.push(tag),
                Disposition::Redrive => {
                    let job = Message {
                        exchange: short(&self.settings.jobs_exchange),
                        routing_key: short(&self.settings.jobs_routing_key),
                        body: &letter.body,
                        properties: letter.redrive_properties(),
                    };
                    if let Err(e) = confirm::publish(channel, job, self.settings.publish_timeout).await {
                        // Unacknowledged, it goes back to the dead-letter queue with the others
                        // (or when the connection closes).
                        kept.push(tag);
                        return Err(QueueError::Unconfirmed(format!(
                            "re-driving {} to the jobs exchange {:?}: {e} (is the jobs queue bound?)",
                            letter.job_id.as_deref().or(letter.message_id.as_deref()).unwrap_or("a dead letter"),
                            self.settings.jobs_exchange
                        )));
                    }
                    channel
                        .basic_ack(tag, BasicAckOptions::default())
                        .await
                        .map_err(|e| broker("acknowledging a re-driven dead letter", e))?;
                    summary.redriven += 1;
                }
            }
        }
        for tag in kept {
            channel
                .basic_nack(tag, BasicNackOptions { multiple: false, requeue: true })
                .await
                .map_err(|e| broker("returning a dead letter", e))?;
        }
        Ok(summary)
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.session.close("done").await;
    }
}
