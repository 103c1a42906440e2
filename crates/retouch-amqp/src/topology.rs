//! The broker topology of the job protocol and its idempotent declaration.
//!
//! ```text
//! retouch.jobs (direct) --retouch.jobs--> retouch.jobs (quorum; x-delivery-limit,
//!                                                        x-dead-letter-exchange=retouch.dlx)
//! retouch.jobs --retouch.jobs.high-------> retouch.jobs.high (quorum; the same arguments)
//! retouch.dlx (fanout) ------------------> retouch.dead (quorum)
//! retouch.results (topic)                  <status>.<campaign|none>, progress.<campaign|none>;
//!                                          nothing bound by default
//! retouch.results --{succeeded,failed,cancelled}.<c>--> retouch.results.campaign.<c> (quorum;
//!                                          per campaign, declared by `retouch submit`/`watch`)
//! retouch.cancel (fanout) ---------------> retouch.cancel (stream; x-max-age = cancel_retention)
//! (default exchange) --------------------> retouch.webhooks (quorum; x-delivery-limit, dead
//!                                          letters to retouch.webhooks.dead through the default
//!                                          exchange)
//! ```
//!
//! Every declaration of this crate is here. `config/rabbitmq/definitions.json` is the same topology for brokers that are provisioned
//! ahead (`declare_topology = false`); a test checks the two agree.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::settings::AmqpSettings;

/// Why the topology could not be declared or checked.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A queue exists with other arguments (406 `PRECONDITION_FAILED - inequivalent arg`).
    /// Queue arguments are immutable, so declaring cannot fix it.
    #[error(
        "queue {queue:?} already exists with a different {argument:?} ({detail}); queue arguments \
         cannot change in place. Fix: {hint}"
    )]
    QueueMismatch {
        /// The queue.
        queue: String,
        /// The argument that differs (`x-delivery-limit`, `x-queue-type`, `durable`, …).
        argument: String,
        /// The broker's words, with the received and current values.
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// An exchange exists with another type or durability.
    #[error(
        "exchange {exchange:?} already exists with different properties ({detail}). Fix: delete the \
         exchange so it is redeclared, or configure another name"
    )]
    ExchangeMismatch {
        /// The exchange.
        exchange: String,
        /// The broker's words.
        detail: String,
    },
    /// A passive check found nothing (`declare_topology = false`).
    #[error(
        "{kind} {name:?} does not exist in the vhost and declare_topology is off: provision it \
         (config/rabbitmq/definitions.json) or enable declare_topology"
    )]
    Missing {
        /// `queue` or `exchange`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Any other broker or connection failure while declaring.
    #[error("{what}: {source}")]
    Broker {
        /// The operation, e.g. `declaring queue "retouch.jobs"`.
        what: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

impl TopologyError {
    /// Whether reconnecting could help: mismatches and missing entities need an operator.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Broker { .. })
    }
}

/// The arguments the jobs queue is declared with.
pub fn jobs_queue_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(settings.delivery_limit)));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(settings.dead_letter_exchange.as_str().into()));
    args
}

/// The arguments the dead-letter queue is declared with (a quorum queue without a limit or
/// a dead-letter target of its own: it is the end of the line).
pub fn dead_letter_queue_arguments() -> FieldTable {
    quorum_arguments()
}

/// The arguments of the webhook delivery queue: quorum, the jobs' delivery limit, and dead
/// letters (a relay that keeps crashing on a delivery) to the webhook dead-letter queue.
pub fn webhook_queue_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut args = quorum_arguments();
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(settings.delivery_limit)));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(settings.webhook_dead_queue.as_str().into()));
    args
}

/// The arguments of the cancel stream: a stream queue that keeps `cancel_retention`.
pub fn cancel_stream_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(format!("{}s", settings.cancel_retention.as_secs().max(1)).into()),
    );
    args
}

/// `x-queue-type = quorum` alone.
fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() }
}

/// Declares the protocol's exchanges, queues and bindings (see the module docs), or, with
/// `settings.declare_topology = false`, only checks passively that the jobs queue exists.
///
/// Idempotent: declaring an existing, equal topology changes nothing.
///
/// A failed declaration closes `channel` (that is how AMQP reports it): use a channel of its
/// own and drop it afterwards.
///
/// # Errors
/// [`TopologyError::QueueMismatch`] (naming the queue, the argument and the fix) when a
/// queue exists with other arguments, [`TopologyError::ExchangeMismatch`],
/// [`TopologyError::Missing`] from the passive check, [`TopologyError::Broker`] otherwise.
pub async fn declare_topology(channel: &Channel, settings: &AmqpSettings) -> Result<(), TopologyError> {
    if !settings.declare_topology {
        check_queue_exists(channel, &settings.jobs_queue).await?;
        if settings.has_high_priority_queue() {
            check_queue_exists(channel, &settings.high_priority_queue).await?;
        }
        return Ok(());
    }
    for (name, kind) in [
        (&settings.jobs_exchange, ExchangeKind::Direct),
        (&settings.results_exchange, ExchangeKind::Topic),
        (&settings.dead_letter_exchange, ExchangeKind::Fanout),
        (&settings.cancel_exchange, ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(short(name), kind, durable_exchange(), FieldTable::default())
            .await
            .map_err(|e| classify(e, "exchange", name, settings))?;
    }
    // The dead-letter queue first: a job queue without its target would drop dead letters.
    declare_queue(channel, &settings.dead_letter_queue, dead_letter_queue_arguments(), settings).await?;
    bind(channel, &settings.dead_letter_queue, &settings.dead_letter_exchange, "").await?;
    declare_queue(channel, &settings.jobs_queue, jobs_queue_arguments(settings), settings).await?;
    bind(channel, &settings.jobs_queue, &settings.jobs_exchange, &settings.jobs_routing_key).await?;
    if settings.has_high_priority_queue() {
        let queue = &settings.high_priority_queue;
        declare_queue(channel, queue, jobs_queue_arguments(settings), settings).await?;
        bind(channel, queue, &settings.jobs_exchange, &settings.high_priority_routing_key).await?;
    }
    declare_queue(channel, &settings.cancel_stream, cancel_stream_arguments(settings), settings).await?;
    bind(channel, &settings.cancel_stream, &settings.cancel_exchange, "").await?;
    declare_queue(channel, &settings.webhook_dead_queue, quorum_arguments(), settings).await?;
    declare_queue(channel, &settings.webhook_queue, webhook_queue_arguments(settings), settings).await?;
    Ok(())
}

/// The name of `campaign`'s results queue: `<results_exchange>.campaign.<campaign>`.
pub fn campaign_queue(settings: &AmqpSettings, campaign: &str) -> String {
    format!("{}.campaign.{campaign}", settings.results_exchange)
}

/// Declares (idempotently) the results exchange and the durable quorum queue that collects
/// `campaign`'s results, bound with `succeeded.<campaign>`, `failed.<campaign>` and
/// `cancelled.<campaign>`, and returns
/// the queue's name ([`campaign_queue`]). `retouch submit` declares it before publishing any
/// job, so no result of the campaign is missed even when nobody watches yet.
///
/// # Errors
/// As [`declare_topology`]: [`TopologyError::QueueMismatch`] or
/// [`TopologyError::ExchangeMismatch`] for existing objects with other properties,
/// [`TopologyError::Broker`] otherwise.
pub async fn declare_campaign_queue(
    channel: &Channel,
    settings: &AmqpSettings,
    campaign: &str,
) -> Result<String, TopologyError> {
    let exchange = &settings.results_exchange;
    channel
        .exchange_declare(short(exchange), ExchangeKind::Topic, durable_exchange(), FieldTable::default())
        .await
        .map_err(|e| classify(e, "exchange", exchange, settings))?;
    let name = campaign_queue(settings, campaign);
    declare_queue(channel, &name, quorum_arguments(), settings).await?;
    for status in ["succeeded", "failed", "cancelled"] {
        bind(channel, &name, exchange, &format!("{status}.{campaign}")).await?;
    }
    Ok(name)
}

/// Passively declares `queue`; returns its ready-message count.
///
/// # Errors
/// [`TopologyError::Missing`] when it does not exist (the channel is then closed),
/// [`TopologyError::Broker`] otherwise.
pub async fn check_queue_exists(channel: &Channel, queue: &str) -> Result<u32, TopologyError> {
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(short(queue), options, FieldTable::default()).await {
        Ok(q) => Ok(q.message_count()),
        Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
            Err(TopologyError::Missing { kind: "queue", name: queue.to_owned() })
        }
        Err(e) => Err(TopologyError::Broker { what: format!("checking queue {queue:?}"), source: e }),
    }
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    settings: &AmqpSettings,
) -> Result<(), TopologyError> {
    channel
        .queue_declare(short(name), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| classify(e, "queue", name, settings))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), TopologyError> {
    channel
        .queue_bind(short(queue), short(exchange), short(key), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(|e| TopologyError::Broker {
            what: format!("binding queue {queue:?} to exchange {exchange:?}"),
            source: e,
        })
}

/// The soft (channel-level) AMQP error code of `e`, if it is one.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn classify(e: lapin::Error, kind: &'static str, name: &str, settings: &AmqpSettings) -> TopologyError {
    let message = match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().to_string(),
        _ => String::new(),
    };
    if soft_error(&e) != Some(AMQPSoftError::PRECONDITIONFAILED) {
        return TopologyError::Broker { what: format!("declaring {kind} {name:?}"), source: e };
    }
    // 3.10.8: "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in
    // vhost '/': received '10' but current is '2'"
    let detail = message.split_once(" - ").map_or(message.as_str(), |(_, d)| d).to_owned();
    if kind == "exchange" {
        return TopologyError::ExchangeMismatch { exchange: name.to_owned(), detail };
    }
    let argument = between(&detail, "inequivalent arg '", "'").unwrap_or("arguments").to_owned();
    let current = between(&detail, "current is '", "'");
    let hint = match (argument.as_str(), current) {
        ("x-delivery-limit", Some(current)) => format!(
            "set delivery_limit = {current} to match the existing queue, or delete queue {name:?} \
             (after draining it) so it is redeclared with delivery_limit = {} (or manage the limit \
             with a `delivery-limit` policy instead)",
            settings.delivery_limit
        ),
        ("x-delivery-limit", None) => format!(
            "match delivery_limit to the existing queue {name:?}, or delete the queue (after \
             draining it) so it is redeclared"
        ),
        _ => format!(
            "delete queue {name:?} (after draining it) so it is redeclared as a durable quorum \
             queue with these arguments, or point the settings at a queue that matches"
        ),
    };
    TopologyError::QueueMismatch { queue: name.to_owned(), argument, detail, hint }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// A name validated by [`AmqpSettings::validate`] as ≤ 255 bytes.
pub(crate) fn short(s: &str) -> ShortString {
    ShortString::try_new(s).unwrap_or_else(|_| {
        // Unreachable after validation; keep lapin from panicking on an oversize name anyway.
        let mut end = 255;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        ShortString::from(&s[..end])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_argument_from_the_broker_message() {
        let d = "inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received '10' but current is '2'";
        assert_eq!(between(d, "inequivalent arg '", "'"), Some("x-delivery-limit"));
        assert_eq!(between(d, "current is '", "'"), Some("2"));
        assert_eq!(between(d, "nope '", "'"), None);
        assert_eq!(short(&"é".repeat(200)).as_str().len(), 254);
    }
}
