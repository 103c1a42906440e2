//! Operator tools on the broker: a campaign's own durable results queue (for `retouch watch`)
//! and reading or re-driving the dead letters (`retouch dead-letters`).
//!
//! Dead letters are read with `basic.get` and held unacknowledged until the end of a pass, so
//! a pass sees every message that was in the queue when it began exactly once; messages that
//! are only listed (or do not match a re-drive filter) are returned with `nack(requeue)`.
//! Re-driven messages are published to the jobs exchange with confirms and `mandatory`, and
//! only then acknowledged on the dead-letter queue: nothing is lost if the tool dies midway.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use retouch_core::job::EditJob;
use retouch_core::queue::QueueError;

use crate::connection::open;
use crate::delivery::{HEADER_ATTEMPT, HEADER_DEAD_LETTERED_AT, HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE};
use crate::settings::AmqpSettings;
use crate::topology::short;

fn broker(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Broker(format!("{what}: {e}"))
}

/// The name of a campaign's results queue.
pub fn campaign_queue(settings: &AmqpSettings, campaign: &str) -> String {
    format!("{}.campaign.{campaign}", settings.results_exchange)
}

/// A connection for operator commands, with a confirm channel.
pub struct Admin {
    connection: Connection,
    channel: Channel,
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
    /// Connects.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the broker is unreachable.
    pub async fn connect(settings: AmqpSettings) -> Result<Self, QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let connection = open(&settings, "admin").await.map_err(QueueError::Broker)?;
        let channel = connection.create_channel().await.map_err(|e| broker("opening a channel", e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| broker("confirm.select", e))?;
        Ok(Self { connection, channel, settings })
    }

    /// The channel (confirm mode).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Declares (idempotently) the durable queue that collects `campaign`'s results, bound to
    /// the results exchange with `succeeded.<campaign>` and `failed.<campaign>`, and returns
    /// its name. Declared by `retouch submit` before any job is published, so no result of
    /// the campaign is missed even when nobody watches yet.
    ///
    /// # Errors
    /// [`QueueError::Broker`] on broker errors.
    pub async fn declare_campaign_queue(&self, campaign: &str) -> Result<String, QueueError> {
        let exchange = short(&self.settings.results_exchange);
        self.channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker("declaring the results exchange", e))?;
        let name = campaign_queue(&self.settings, campaign);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        self.channel
            .queue_declare(short(&name), QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await
            .map_err(|e| broker(&format!("declaring {name}"), e))?;
        for status in ["succeeded", "failed"] {
            self.channel
                .queue_bind(
                    short(&name),
                    exchange.clone(),
                    short(&format!("{status}.{campaign}")),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker(&format!("binding {name}"), e))?;
        }
        Ok(name)
    }

    /// Deletes a queue (a finished campaign's results queue).
    ///
    /// # Errors
    /// [`QueueError::Broker`] on broker errors.
    pub async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        self.channel
            .queue_delete(short(name), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| broker(&format!("deleting {name}"), e))
    }

    /// Messages ready in `queue` (passive declare).
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the queue does not exist.
    pub async fn ready(&self, queue: &str) -> Result<u32, QueueError> {
        self.channel
            .queue_declare(
                short(queue),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .map_err(|e| broker(&format!("queue {queue}"), e))
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
        let mut summary = PassSummary::default();
        let mut kept = Vec::new();
        while summary.seen < budget {
            let Some(message) = self
                .channel
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
                    let confirm = self
                        .channel
                        .basic_publish(
                            short(&self.settings.jobs_exchange),
                            short(&self.settings.jobs_routing_key),
                            BasicPublishOptions { mandatory: true, immediate: false },
                            &letter.body,
                            letter.redrive_properties(),
                        )
                        .await
                        .map_err(|e| broker("re-publishing a job", e))?
                        .await
                        .map_err(|e| broker("waiting for the confirm", e))?;
                    if !confirm.is_ack() || confirm.take_message().is_some() {
                        kept.push(tag);
                        return Err(QueueError::Unconfirmed(format!(
                            "the jobs exchange {} did not accept a re-driven job (is the jobs queue bound?)",
                            self.settings.jobs_exchange
                        )));
                    }
                    self.channel
                        .basic_ack(tag, BasicAckOptions::default())
                        .await
                        .map_err(|e| broker("acknowledging a re-driven dead letter", e))?;
                    summary.redriven += 1;
                }
            }
        }
        for tag in kept {
            self.channel
                .basic_nack(tag, BasicNackOptions { multiple: false, requeue: true })
                .await
                .map_err(|e| broker("returning a dead letter", e))?;
        }
        Ok(summary)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.channel.wait_for_confirms().await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}
