//! [`AmqpPublisher`]: results (implements [`ResultSink`]) and jobs, through the one confirmed
//! publish of [`crate::confirm`] (confirms, `mandatory`), over a session of its own that it
//! rebuilds when lost.
//!
//! * A result goes to the results topic exchange (routing key `<status>.<campaign|none>`)
//!   and, when the job had a `reply_to`, to that queue through the default exchange with the
//!   job's `correlation_id`. A result nobody is bound to receive is returned by the broker
//!   (312 `NO_ROUTE`): that is logged and counted in `unroutable_results`, never an error,
//!   so a results exchange without consumers cannot stall job processing.
//! * A job that no queue receives is an error: it would be lost.
//! * Bulk job publishing pipelines: up to [`JOB_CONFIRM_WINDOW`] publishes are in flight before
//!   the oldest confirm is awaited.
//!
//! Reconnection is lazy and single-flight: a publish that finds the connection gone rebuilds
//! it (after the backoff) while holding the session lock, so concurrent publishers wait for
//! that one attempt instead of starting their own; the lock is never held while publishing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use retouch_core::backoff::Backoff;
use retouch_core::events::{CancelRequest, JobEvent};
use retouch_core::job::{JobResult, Priority};
use retouch_core::queue::{DeliveryInfo, QueueCounters, QueueError, ResultSink};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::confirm::{self, Message, Pending, PublishError};
use crate::session::{Session, Topology};
use crate::settings::AmqpSettings;
use crate::topology::short;

/// Publishes in flight (unconfirmed) at most, in [`AmqpPublisher::publish_jobs`]. A few
/// thousand keeps the broker's confirm batching busy without holding much memory.
pub const JOB_CONFIRM_WINDOW: usize = 4096;

/// Optional AMQP properties of a published job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobPublishOptions {
    /// A queue that should also receive the job's result.
    pub reply_to: Option<String>,
    /// Echoed on the result (`correlation_id`).
    pub correlation_id: Option<String>,
    /// `High` goes to the high-priority queue (when one is configured).
    pub priority: Priority,
}

/// One job for [`AmqpPublisher::publish_jobs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingJob {
    /// The JSON body.
    pub body: Vec<u8>,
    /// AMQP `message_id`: the job id.
    pub message_id: String,
    /// `reply_to` and `correlation_id`.
    pub options: JobPublishOptions,
}

/// Confirmed publishing of results and jobs. Share it by reference (`&self` everywhere);
/// create it with [`AmqpPublisher::connect`].
pub struct AmqpPublisher {
    /// Names, `publish_timeout`, reconnect backoff.
    settings: Arc<AmqpSettings>,
    /// Receives `unroutable_results` and `reconnects`.
    counters: Arc<QueueCounters>,
    /// Held while (re)connecting, never while publishing: see the module docs.
    state: Mutex<State>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// The publisher's connection state, owned behind [`AmqpPublisher::state`].
struct State {
    /// The current session; `None` after a loss until the next publish reconnects.
    session: Option<Session>,
    /// Reconnect delays; reset by a successful reconnect.
    backoff: Backoff,
    /// No reconnect attempt before this (the backoff after a failed one).
    not_before: Option<Instant>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn short_prop(what: &str, value: &str) -> Result<ShortString, QueueError> {
    ShortString::try_new(value).map_err(|_| QueueError::Broker(format!("{what} {value:?}: longer than 255 bytes")))
}

/// Persistent JSON with a timestamp.
fn base_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(now_secs())
}

/// Where a result went, for messages.
fn target(exchange: &str, key: &str) -> String {
    if exchange.is_empty() { format!("reply_to {key:?}") } else { format!("exchange {exchange:?}") }
}

impl AmqpPublisher {
    /// Validates `settings`, connects and declares (or checks) the topology. `counters`
    /// receives `unroutable_results` and `reconnects` (share the source's, or not).
    ///
    /// The first connection is not retried (see [`AmqpSource::connect`]); later losses are
    /// recovered by the next publish.
    ///
    /// # Errors
    /// [`QueueError::Broker`] for invalid settings, an unreachable broker or a mismatched
    /// topology.
    ///
    /// [`AmqpSource::connect`]: crate::AmqpSource::connect
    pub async fn connect(settings: AmqpSettings, counters: Arc<QueueCounters>) -> Result<Self, QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let session = Session::open(&settings, "publish", Topology::Declare).await?;
        info!(url = %settings.redacted_url(), results = %settings.results_exchange, "publisher connected");
        Ok(Self {
            state: Mutex::new(State {
                session: Some(session),
                backoff: settings.reconnect_backoff(),
                not_before: None,
            }),
            settings: Arc::new(settings),
            counters,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// Closes the connection after waiting for outstanding confirms.
    pub async fn shutdown(self) {
        if let Some(s) = self.state.into_inner().session {
            s.close("shutting down").await;
        }
    }

    /// The current confirm channel, reconnecting (after the backoff) when it is gone. Callers
    /// bound the wait with `publish_timeout`.
    async fn channel(&self) -> Result<Channel, QueueError> {
        let mut state = self.state.lock().await;
        loop {
            if let Some(s) = &state.session {
                if s.healthy() {
                    return Ok(s.confirm.clone());
                }
                state.session = None;
                warn!("AMQP publisher connection lost; reconnecting");
            }
            if let Some(at) = state.not_before {
                tokio::time::sleep_until(at).await;
            }
            match Session::open(&self.settings, "publish", Topology::Declare).await {
                Ok(s) => {
                    state.session = Some(s);
                    state.backoff.reset();
                    state.not_before = None;
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!("AMQP publisher reconnected");
                }
                Err(e) => {
                    state.not_before = Some(Instant::now() + state.backoff.next_delay());
                    if e.is_permanent() {
                        return Err(e.into());
                    }
                    warn!(error = %e, "AMQP publisher reconnect failed");
                }
            }
        }
    }

    /// Forgets `channel`'s session if it is still the current one (after a transport failure).
    async fn invalidate(&self, channel: &Channel) {
        let mut state = self.state.lock().await;
        if state.session.as_ref().is_some_and(|s| s.confirm.id() == channel.id() && !s.healthy()) {
            state.session = None;
        }
    }

    /// Runs `op` under `publish_timeout`.
    async fn timed<T>(&self, what: &str, op: impl Future<Output = Result<T, QueueError>>) -> Result<T, QueueError> {
        tokio::time::timeout(self.settings.publish_timeout, op).await.unwrap_or_else(|_| {
            Err(QueueError::Unconfirmed(format!("{what}: not confirmed within {:?}", self.settings.publish_timeout)))
        })
    }

    /// Publishes one job to the jobs exchange (persistent, `mandatory`, `timestamp` now) and
    /// waits for its confirm.
    ///
    /// # Errors
    /// [`QueueError::Unconfirmed`] when the broker nacks it, returns it as unroutable (no
    /// queue bound: the job would be lost) or does not confirm within `publish_timeout`;
    /// [`QueueError::Broker`] for an id or `reply_to` over 255 bytes.
    pub async fn publish_job(&self, body: &[u8], message_id: &str, extra: JobPublishOptions) -> Result<(), QueueError> {
        let job = OutgoingJob { body: body.to_vec(), message_id: message_id.to_owned(), options: extra };
        self.publish_jobs(std::iter::once(job)).await.map(|_| ())
    }

    /// Publishes many jobs with pipelined confirms (up to [`JOB_CONFIRM_WINDOW`] in flight)
    /// and returns how many were confirmed. Stops at the first failure, waits for the
    /// confirms already in flight, and reports the failure; jobs are idempotent by id, so
    /// the caller may publish the whole batch again.
    ///
    /// # Errors
    /// As [`publish_job`](Self::publish_job), naming the first job that failed and how many
    /// were confirmed.
    pub async fn publish_jobs<I>(&self, jobs: I) -> Result<u64, QueueError>
    where
        I: IntoIterator<Item = OutgoingJob>,
    {
        let timeout = self.settings.publish_timeout;
        let channel = self.timed("connecting", self.channel()).await?;
        let mut window: VecDeque<(String, Pending)> = VecDeque::with_capacity(JOB_CONFIRM_WINDOW.min(1024));
        let mut confirmed = 0u64;
        // The first failure: the job's id and why.
        let mut failure: Option<(String, PublishError)> = None;
        // Awaits the oldest confirm in flight.
        let mut settle =
            async |(id, pending): (String, Pending), failure: &mut Option<(String, PublishError)>| match pending
                .wait(timeout)
                .await
            {
                Ok(()) => confirmed += 1,
                Err(e) => {
                    failure.get_or_insert((id, e));
                }
            };

        for job in jobs {
            if window.len() >= JOB_CONFIRM_WINDOW
                && let Some(oldest) = window.pop_front()
            {
                settle(oldest, &mut failure).await;
            }
            if failure.is_some() {
                break;
            }
            let mut properties = base_properties().with_message_id(short_prop("message_id", &job.message_id)?);
            if let Some(r) = &job.options.reply_to {
                properties = properties.with_reply_to(short_prop("reply_to", r)?);
            }
            if let Some(c) = &job.options.correlation_id {
                properties = properties.with_correlation_id(short_prop("correlation_id", c)?);
            }
            let message = Message {
                exchange: short(&self.settings.jobs_exchange),
                routing_key: short(self.routing_key(job.options.priority)),
                body: &job.body,
                properties,
            };
            match confirm::send(&channel, message).await {
                Ok(pending) => window.push_back((job.message_id, pending)),
                Err(e) => {
                    failure = Some((job.message_id, e));
                    break;
                }
            }
        }
        while let Some(oldest) = window.pop_front() {
            settle(oldest, &mut failure).await;
        }
        let Some((id, why)) = failure else { return Ok(confirmed) };
        if why.is_transport() {
            self.invalidate(&channel).await;
        }
        Err(QueueError::Unconfirmed(format!(
            "publishing to exchange {:?} with key {:?}: job {id:?}: {why} ({confirmed} jobs confirmed)",
            self.settings.jobs_exchange, self.settings.jobs_routing_key
        )))
    }

    /// The routing key of jobs of `priority`.
    fn routing_key(&self, priority: Priority) -> &str {
        if priority == Priority::High && self.settings.has_high_priority_queue() {
            &self.settings.high_priority_routing_key
        } else {
            &self.settings.jobs_routing_key
        }
    }

    /// One attempt at publishing a result (to the results exchange, its reply and its webhook
    /// delivery); the error says whether the channel failed underneath (worth one more attempt).
    async fn publish_result_once(
        &self,
        result: &ResultMessage<'_>,
        info: &DeliveryInfo,
    ) -> Result<(), (QueueError, bool)> {
        let ResultMessage { body, routing_key, message_id, status, webhook } = *result;
        let channel = self.channel().await.map_err(|e| (e, false))?;
        let mut properties = base_properties();
        if !message_id.is_empty() {
            properties = properties.with_message_id(short_prop("message_id", message_id).map_err(|e| (e, false))?);
        }
        if let Some(c) = &info.correlation_id {
            properties = properties.with_correlation_id(short_prop("correlation_id", c).map_err(|e| (e, false))?);
        }
        // (exchange, routing key, properties, must be routed)
        let mut targets = vec![(self.settings.results_exchange.as_str(), routing_key, properties.clone(), false)];
        if let Some(reply_to) = &info.reply_to {
            targets.push(("", reply_to.as_str(), properties.clone(), false));
        }
        if let Some(url) = webhook {
            // The delivery's id (Standard Webhooks' `webhook-id`) is the same for every copy of
            // this result, so a receiver can drop the duplicates of a redelivered job.
            let id = format!("{message_id}.{status}");
            let mut headers = FieldTable::default();
            headers.insert(HEADER_WEBHOOK_URL.into(), AMQPValue::LongString(url.into()));
            let hook = properties
                .clone()
                .with_message_id(short_prop("webhook id", &id).map_err(|e| (e, false))?)
                .with_headers(headers);
            targets.push(("", self.settings.webhook_queue.as_str(), hook, true));
        }
        // Every publish goes out before any confirm is awaited.
        let mut pending = Vec::with_capacity(targets.len());
        for (exchange, key, properties, _) in &targets {
            let message = Message {
                exchange: short(exchange),
                routing_key: short_prop("routing key", key).map_err(|e| (e, false))?,
                body,
                properties: properties.clone(),
            };
            pending.push(confirm::send(&channel, message).await);
        }
        let mut error = None;
        for ((exchange, key, _, must_route), sent) in targets.iter().zip(pending) {
            let (exchange, key) = (*exchange, *key);
            let outcome = match sent {
                Ok(p) => p.confirmed().await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => debug!(exchange, key, job = message_id, "result published"),
                Err(PublishError::Unroutable { code, text }) if !must_route => {
                    self.counters.unroutable_results.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        exchange,
                        key,
                        job = message_id,
                        code,
                        text,
                        "result unroutable: nothing is bound to receive it"
                    );
                }
                Err(e) => {
                    let message = format!("result of {message_id:?} to {}: {e}", target(exchange, key));
                    error.get_or_insert((QueueError::Unconfirmed(message), e.is_transport()));
                }
            }
        }
        match error {
            None => Ok(()),
            Some((e, transport)) => {
                if transport {
                    self.invalidate(&channel).await;
                }
                Err((e, transport))
            }
        }
    }
}

/// A serialised result on its way out.
#[derive(Clone, Copy)]
struct ResultMessage<'a> {
    /// The JSON.
    body: &'a [u8],
    /// `<status>.<campaign|none>`.
    routing_key: &'a str,
    /// The job id (or the delivery's message id).
    message_id: &'a str,
    /// The result's status word (`succeeded`, `failed`, `cancelled`).
    status: &'a str,
    /// The job's webhook URL, when it asked for one.
    webhook: Option<&'a str>,
}

/// Header of a webhook delivery message: the URL to POST to.
pub const HEADER_WEBHOOK_URL: &str = "x-retouch-webhook-url";

impl AmqpPublisher {
    /// Publishes a cancel request to the cancel exchange (and so to the cancel stream) and
    /// waits for its confirm.
    ///
    /// # Errors
    /// [`QueueError::Unconfirmed`] when it is not confirmed or no stream receives it.
    pub async fn publish_cancel(&self, request: &CancelRequest) -> Result<(), QueueError> {
        let body = serde_json::to_vec(request).map_err(|e| QueueError::Broker(format!("serialising a cancel: {e}")))?;
        self.timed("publishing a cancel request", async {
            let channel = self.channel().await?;
            let message = Message {
                exchange: short(&self.settings.cancel_exchange),
                routing_key: ShortString::from(""),
                body: &body,
                properties: base_properties(),
            };
            confirm::send(&channel, message)
                .await
                .map_err(|e| QueueError::Unconfirmed(e.to_string()))?
                .confirmed()
                .await
                .map_err(|e| {
                    QueueError::Unconfirmed(format!(
                        "cancel request to exchange {:?}: {e}",
                        self.settings.cancel_exchange
                    ))
                })
        })
        .await
    }
}

impl ResultSink for AmqpPublisher {
    async fn publish(&self, result: &JobResult, info: &DeliveryInfo, webhook: Option<&str>) -> Result<(), QueueError> {
        let body = serde_json::to_vec(result).map_err(|e| QueueError::Broker(format!("serialising a result: {e}")))?;
        let routing_key = result.routing_key();
        let message_id = if result.job_id.is_empty() {
            info.message_id.as_deref().unwrap_or_default()
        } else {
            result.job_id.as_str()
        };
        let message = ResultMessage {
            body: &body,
            routing_key: &routing_key,
            message_id,
            status: result.status.as_str(),
            webhook,
        };
        self.timed("publishing a result", async {
            // One retry after a transport failure (connection lost mid-publish): results are
            // idempotent by job id, a duplicate is harmless, a loss costs a job retry.
            match self.publish_result_once(&message, info).await {
                Ok(()) => Ok(()),
                Err((_, true)) => self.publish_result_once(&message, info).await.map_err(|(e, _)| e),
                Err((e, false)) => Err(e),
            }
        })
        .await
    }

    async fn publish_event(&self, event: &JobEvent, reply_to: Option<&str>) -> Result<(), QueueError> {
        let body = serde_json::to_vec(event).map_err(|e| QueueError::Broker(format!("serialising an event: {e}")))?;
        let key = event.routing_key();
        self.timed("publishing an event", async {
            let channel = self.channel().await?;
            // Transient: an event is stale the moment the next one exists.
            let properties = base_properties().with_delivery_mode(1).with_type(ShortString::from("progress"));
            let mut targets = vec![(self.settings.results_exchange.as_str(), key.as_str())];
            if let Some(reply_to) = reply_to {
                targets.push(("", reply_to));
            }
            for (exchange, key) in targets {
                let message = Message {
                    exchange: short(exchange),
                    routing_key: short_prop("routing key", key)?,
                    body: &body,
                    properties: properties.clone(),
                };
                if let Err(e) = confirm::send_best_effort(&channel, message).await {
                    if e.is_transport() {
                        self.invalidate(&channel).await;
                    }
                    return Err(QueueError::Broker(format!("event to {}: {e}", target(exchange, key))));
                }
            }
            Ok(())
        })
        .await
    }
}
