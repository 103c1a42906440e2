//! [`AmqpSettings`]: where the broker is, what the topology is called, and how the consumer
//! and the reconnect loop behave. Plain data with every default here; it is also the `[amqp]`
//! section of the worker's configuration file, which deserializes straight into it.

use std::fmt;
use std::time::Duration;

use retouch_core::backoff::Backoff;
use retouch_core::redact::redact_url;
use serde::{Deserialize, Serialize};

/// Everything the AMQP source and publisher need. `Debug` redacts the password in [`url`].
///
/// The defaults describe the protocol's standard topology (`retouch.jobs` → quorum queue
/// `retouch.jobs`, results on `retouch.results`, dead letters via `retouch.dlx` into
/// `retouch.dead`) on a local broker.
///
/// [`url`]: AmqpSettings::url
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URI, `amqp[s]://user:password@host:port/vhost` (the default vhost `/` is written
    /// `%2f`). Query parameters such as `?heartbeat=30` or `?frame_max=131072` are honoured
    /// by lapin. Contains a secret: `Debug` prints it as `amqp://user:***@host…`.
    ///
    /// For a cluster, several URIs separated by commas and/or whitespace
    /// (`amqp://u:p@mq1:5672/%2f, amqp://u:p@mq2:5672/%2f`): a connection tries them in order
    /// and keeps the first that answers; a reconnect starts with the URI after the one last
    /// connected, so losing a node moves the connection to the next. Each entry must start
    /// with `amqp://` or `amqps://` (a separator is only recognised before one of those, so a
    /// comma inside a password stays part of it). Give each worker the list starting at a
    /// different node to spread the fleet.
    pub url: String,
    /// Durable **direct** exchange that jobs are published to (`retouch.jobs`).
    pub jobs_exchange: String,
    /// Routing key of jobs on [`jobs_exchange`](Self::jobs_exchange), and the key the jobs
    /// queue is bound with (`retouch.jobs`).
    pub jobs_routing_key: String,
    /// The quorum queue workers consume (`retouch.jobs`). Declared with `x-queue-type=quorum`,
    /// `x-delivery-limit=`[`delivery_limit`](Self::delivery_limit) and
    /// `x-dead-letter-exchange=`[`dead_letter_exchange`](Self::dead_letter_exchange).
    pub jobs_queue: String,
    /// The quorum queue of `high`-priority jobs (`retouch.jobs.high`), bound to
    /// [`jobs_exchange`](Self::jobs_exchange) with [`high_priority_routing_key`](Self::high_priority_routing_key),
    /// declared with the jobs queue's arguments. Workers consume it beside the jobs queue, with
    /// its own prefetch, and always take a waiting high job before a normal one. Empty = no
    /// priority queue (every job is normal).
    pub high_priority_queue: String,
    /// Routing key of high-priority jobs (`retouch.jobs.high`).
    pub high_priority_routing_key: String,
    /// Durable **fanout** exchange that cancel requests are published to (`retouch.cancel`).
    pub cancel_exchange: String,
    /// The **stream** queue that keeps cancel requests for
    /// [`cancel_retention`](Self::cancel_retention) (`retouch.cancel`, `x-max-age`): every
    /// worker reads it from the start when it starts, so a cancel reaches workers that did not
    /// exist when it was sent.
    pub cancel_stream: String,
    /// How long a cancel request stays in force (the stream's `x-max-age`; the worker forgets
    /// older ones too). Longer than the longest a job waits in the queue. Default 24 h.
    #[serde(with = "humantime_serde")]
    pub cancel_retention: Duration,
    /// The quorum queue of webhook deliveries (`retouch.webhooks`): a result whose job asked
    /// for a webhook is published here (confirmed) before the job is acked, and the workers'
    /// webhook relay consumes it, so a delivery survives the worker that made it.
    pub webhook_queue: String,
    /// Where deliveries that never succeeded go, with the last HTTP status in headers
    /// (`retouch.webhooks.dead`, quorum).
    pub webhook_dead_queue: String,
    /// Durable **topic** exchange for results (`retouch.results`), routing key
    /// `<status>.<campaign or none>`. Nothing needs to be bound: unroutable results are
    /// counted and logged, never fatal.
    pub results_exchange: String,
    /// Durable **fanout** exchange for dead letters (`retouch.dlx`): both the worker's explicit
    /// dead letters (with reason headers) and the broker's own (delivery limit exceeded,
    /// `reject(requeue=false)`) go through it.
    pub dead_letter_exchange: String,
    /// The quorum queue bound to [`dead_letter_exchange`](Self::dead_letter_exchange)
    /// (`retouch.dead`): where an operator inspects and re-drives failed jobs. Alert on its
    /// depth.
    pub dead_letter_queue: String,
    /// Declare the exchanges, queues and bindings at connect (idempotent). Turn off where the
    /// topology is pre-provisioned (`config/rabbitmq/definitions.json`) or the worker's user
    /// may not configure: then only passive checks run, which fail clearly when something
    /// is missing.
    pub declare_topology: bool,
    /// Deliveries a job gets (`x-delivery-limit`): after `delivery_limit` returns the broker
    /// dead-letters it with reason `delivery_limit`, so a job runs at most
    /// `delivery_limit + 1` times. Also decides [`DeliveryInfo::last_attempt`]
    /// (`x-delivery-count >= delivery_limit`), so it must equal the queue's argument or policy
    /// even when [`declare_topology`](Self::declare_topology) is off. Changing it on an
    /// existing queue needs the queue deleted (arguments are immutable) or a
    /// `delivery-limit` policy. Default 5.
    ///
    /// [`DeliveryInfo::last_attempt`]: retouch_core::queue::DeliveryInfo::last_attempt
    pub delivery_limit: u32,
    /// Unacknowledged deliveries per consumer (`basic.qos`, `global=false`: quorum queues
    /// refuse global QoS): the jobs a worker holds at once — being prepared, in the model,
    /// being uploaded. `0` (the default) is *auto*: [`AmqpSettings::prefetch_or`] resolves it,
    /// and `retouch worker` resolves it to 3 × `engine.max_batch` (one batch being prepared, one
    /// in the model, one uploading), which keeps the GPU busy. More only holds jobs away from
    /// other workers: a delivery's consumer-timeout clock (RabbitMQ's `consumer_timeout`, 30 min
    /// by default) starts when it is sent, so keep the longest job × prefetch below it, and a
    /// crash returns (on RabbitMQ ≤ 4.2 charging an attempt to) the whole window. 0 or 1–2000
    /// (quorum queues cap it at 2000).
    pub prefetch: u16,
    /// Shown in the broker's connection list (`rabbitmqctl list_connections client_properties`);
    /// put the worker's identity here. The source and publisher append `/consume` and
    /// `/publish`.
    pub connection_name: String,
    /// First delay before reconnecting after a loss; doubled per failed attempt up to
    /// [`reconnect_backoff_max`](Self::reconnect_backoff_max), each with up to 50 % random
    /// jitter so a fleet does not reconnect in lockstep. Default 0.5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_min: Duration,
    /// Cap of the reconnect delay. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// How long one publish (result, dead letter or job) may take, reconnecting included,
    /// before it fails with [`QueueError::Unconfirmed`]. Default 30 s.
    ///
    /// [`QueueError::Unconfirmed`]: retouch_core::queue::QueueError::Unconfirmed
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            jobs_exchange: "retouch.jobs".into(),
            jobs_routing_key: "retouch.jobs".into(),
            jobs_queue: "retouch.jobs".into(),
            high_priority_queue: "retouch.jobs.high".into(),
            high_priority_routing_key: "retouch.jobs.high".into(),
            cancel_exchange: "retouch.cancel".into(),
            cancel_stream: "retouch.cancel".into(),
            cancel_retention: Duration::from_secs(24 * 3600),
            webhook_queue: "retouch.webhooks".into(),
            webhook_dead_queue: "retouch.webhooks.dead".into(),
            results_exchange: "retouch.results".into(),
            dead_letter_exchange: "retouch.dlx".into(),
            dead_letter_queue: "retouch.dead".into(),
            declare_topology: true,
            delivery_limit: 5,
            prefetch: 0,
            connection_name: "retouch".into(),
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
        }
    }
}

impl AmqpSettings {
    /// Checks what the broker would otherwise reject late or what would panic inside lapin
    /// (names over 255 bytes).
    ///
    /// # Errors
    /// A message naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(format!("url {:?}: expected amqp:// or amqps://", redact_url(&self.url)));
        }
        for url in &urls {
            let rest = url.strip_prefix("amqps://").or_else(|| url.strip_prefix("amqp://"));
            let host = rest.map(|r| {
                let authority = &r[..r.find(['/', '?', '#']).unwrap_or(r.len())];
                &authority[authority.rfind('@').map_or(0, |at| at + 1)..]
            });
            if host.is_none_or(str::is_empty) || url.contains(char::is_whitespace) {
                return Err(format!(
                    "url {:?}: expected amqp:// or amqps:// and a host (several: separated by commas or whitespace)",
                    redact_url(url)
                ));
            }
        }
        for (field, name) in [
            ("jobs_exchange", &self.jobs_exchange),
            ("jobs_queue", &self.jobs_queue),
            ("results_exchange", &self.results_exchange),
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
            ("cancel_exchange", &self.cancel_exchange),
            ("cancel_stream", &self.cancel_stream),
            ("webhook_queue", &self.webhook_queue),
            ("webhook_dead_queue", &self.webhook_dead_queue),
        ] {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                return Err(format!(
                    "{field} {name:?}: must be 1–255 bytes and not start with \"amq.\" (reserved by RabbitMQ)"
                ));
            }
        }
        if self.jobs_routing_key.len() > 255 || self.high_priority_routing_key.len() > 255 {
            return Err("jobs_routing_key, high_priority_routing_key: at most 255 bytes".into());
        }
        if self.high_priority_queue.len() > 255 || self.high_priority_queue.starts_with("amq.") {
            return Err("high_priority_queue: at most 255 bytes, not starting with \"amq.\"".into());
        }
        if self.has_high_priority_queue()
            && (self.high_priority_queue == self.jobs_queue || self.high_priority_routing_key == self.jobs_routing_key)
        {
            return Err("high_priority_queue and high_priority_routing_key must differ from the jobs queue's".into());
        }
        if self.cancel_retention < Duration::from_secs(1) {
            return Err("cancel_retention: must be at least 1 s".into());
        }
        if self.jobs_queue == self.dead_letter_queue {
            return Err("dead_letter_queue must differ from jobs_queue".into());
        }
        if self.delivery_limit == 0 {
            return Err("delivery_limit: must be at least 1 (0 would dead-letter every retry)".into());
        }
        if self.prefetch > 2000 {
            return Err(format!(
                "prefetch {}: must be 0 (auto) or 1–2000 (quorum queues cap it at 2000)",
                self.prefetch
            ));
        }
        if self.connection_name.len() > 200 {
            return Err("connection_name: longer than 200 bytes".into());
        }
        if self.reconnect_backoff_min.is_zero() || self.reconnect_backoff_max < self.reconnect_backoff_min {
            return Err("reconnect_backoff_min must be > 0 and <= reconnect_backoff_max".into());
        }
        if self.publish_timeout.is_zero() {
            return Err("publish_timeout: must be > 0".into());
        }
        Ok(())
    }

    /// Whether a high-priority queue is configured.
    pub fn has_high_priority_queue(&self) -> bool {
        !self.high_priority_queue.is_empty()
    }

    /// The prefetch to ask for: [`prefetch`](Self::prefetch), or `auto` when it is 0 (auto),
    /// at least 1.
    pub fn prefetch_or(&self, auto: u16) -> u16 {
        if self.prefetch == 0 { auto.clamp(1, 2000) } else { self.prefetch }
    }

    /// The URL with its password replaced by `***`, for logs (every entry of a list, joined
    /// with `, `).
    pub fn redacted_url(&self) -> String {
        let urls = self.urls();
        if urls.len() <= 1 {
            return redact_url(&self.url);
        }
        urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(", ")
    }

    /// The broker URIs of [`url`](Self::url), in order: one for a plain URI, several for a
    /// list separated by commas and/or whitespace. A separator only counts before `amqp://` or
    /// `amqps://`, so a single URI comes back unchanged (trimmed); empty when there is none.
    pub fn urls(&self) -> Vec<&str> {
        split_urls(&self.url)
    }

    /// The reconnect delays: from [`reconnect_backoff_min`](Self::reconnect_backoff_min),
    /// doubling per failed attempt up to [`reconnect_backoff_max`](Self::reconnect_backoff_max),
    /// each scaled by a random factor in [0.5, 1] so that a fleet that lost the same broker
    /// does not return in step.
    pub fn reconnect_backoff(&self) -> Backoff {
        Backoff::new(self.reconnect_backoff_min, self.reconnect_backoff_max).with_jitter(0.5, 1.0)
    }
}

/// See [`AmqpSettings::urls`].
fn split_urls(list: &str) -> Vec<&str> {
    let is_sep = |c: char| c == ',' || c.is_whitespace();
    let list = list.trim_matches(is_sep);
    if list.is_empty() {
        return Vec::new();
    }
    // Starts of entries: 0 and every `amqp://` / `amqps://` preceded by a separator.
    let mut starts = vec![0];
    for (i, c) in list.char_indices() {
        if is_sep(c) {
            let next = i + c.len_utf8();
            let tail = &list[next..];
            if (tail.starts_with("amqp://") || tail.starts_with("amqps://")) && starts.last() != Some(&next) {
                starts.push(next);
            }
        }
    }
    let mut urls = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(list.len());
        let url = list[start..end].trim_matches(is_sep);
        if !url.is_empty() {
            urls.push(url);
        }
    }
    urls
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &self.redacted_url())
            .field("jobs_exchange", &self.jobs_exchange)
            .field("jobs_routing_key", &self.jobs_routing_key)
            .field("jobs_queue", &self.jobs_queue)
            .field("high_priority_queue", &self.high_priority_queue)
            .field("high_priority_routing_key", &self.high_priority_routing_key)
            .field("cancel_exchange", &self.cancel_exchange)
            .field("cancel_stream", &self.cancel_stream)
            .field("cancel_retention", &self.cancel_retention)
            .field("webhook_queue", &self.webhook_queue)
            .field("webhook_dead_queue", &self.webhook_dead_queue)
            .field("results_exchange", &self.results_exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("declare_topology", &self.declare_topology)
            .field("delivery_limit", &self.delivery_limit)
            .field("prefetch", &self.prefetch)
            .field("connection_name", &self.connection_name)
            .field("reconnect_backoff_min", &self.reconnect_backoff_min)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_password() {
        let s = AmqpSettings {
            url: "amqps://worker:s3cr:et@mq.example:5671/prod?heartbeat=30".into(),
            ..Default::default()
        };
        let d = format!("{s:?}");
        assert!(!d.contains("s3cr"), "{d}");
        assert!(d.contains("amqps://worker:***@mq.example:5671/prod?heartbeat=30"), "{d}");
    }

    #[test]
    fn validation_names_the_field() {
        assert!(AmqpSettings::default().validate().is_ok());
        for (s, needle) in [
            (AmqpSettings { prefetch: 2001, ..Default::default() }, "prefetch"),
            (AmqpSettings { delivery_limit: 0, ..Default::default() }, "delivery_limit"),
            (AmqpSettings { jobs_queue: "x".repeat(256), ..Default::default() }, "jobs_queue"),
            (AmqpSettings { results_exchange: "amq.topic".into(), ..Default::default() }, "results_exchange"),
            (AmqpSettings { url: "http://x".into(), ..Default::default() }, "url"),
        ] {
            let e = s.validate().expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_single_url_is_unchanged() {
        let s = AmqpSettings::default();
        assert_eq!(s.urls(), vec!["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        assert_eq!(s.redacted_url(), "amqp://guest:***@127.0.0.1:5672/%2f");
        // A comma inside a password is not a separator.
        let s = AmqpSettings { url: " amqp://u:a,b@h:5672/%2f?heartbeat=5 ".into(), ..Default::default() };
        assert_eq!(s.urls(), vec!["amqp://u:a,b@h:5672/%2f?heartbeat=5"]);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_url_list_is_split_validated_and_redacted() {
        let s = AmqpSettings {
            url: "amqp://u:p1@a:5672/%2f, amqps://u:p2@b:5671/v\n  amqp://c:5673/%2f,".into(),
            ..Default::default()
        };
        assert_eq!(s.urls(), vec!["amqp://u:p1@a:5672/%2f", "amqps://u:p2@b:5671/v", "amqp://c:5673/%2f"]);
        assert!(s.validate().is_ok());
        let r = s.redacted_url();
        assert_eq!(r, "amqp://u:***@a:5672/%2f, amqps://u:***@b:5671/v, amqp://c:5673/%2f");
        let d = format!("{s:?}");
        assert!(!d.contains("p1") && !d.contains("p2"), "{d}");

        for bad in
            ["", " , ", "amqp://a:5672/%2f, http://b:5672/%2f", "amqp://a/%2f,amqp://", "amqp://a/%2f amqps:///x"]
        {
            let s = AmqpSettings { url: bad.into(), ..Default::default() };
            let e = s.validate().expect_err(bad);
            assert!(e.starts_with("url"), "{bad:?}: {e}");
        }
        // A bad entry's password is not shown.
        let s = AmqpSettings { url: "amqp://a/%2f, amqp://u:hunter2@/x".into(), ..Default::default() };
        let e = s.validate().expect_err("no host");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
