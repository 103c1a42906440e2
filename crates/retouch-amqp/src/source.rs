//! [`AmqpSource`]: the jobs queue as a [`JobSource`], over one connection the source
//! supervises itself.
//!
//! A session is a `session::Session` (connect, declare or check the topology, a
//! publisher-confirm channel for dead letters) plus a consuming channel:
//! `basic.qos(prefetch, global=false)` → `basic.consume` (manual acks). When the consumer stream
//! fails or ends (connection lost, channel closed by a consumer timeout, consumer cancelled
//! by the broker) while the source is not closing, [`next`](JobSource::next) drops the
//! session, marks `connected = false`, backs off (capped exponential with jitter) and builds a
//! new one, counting `reconnects`. Deliveries from the old session stay with their holders:
//! settling them gives [`QueueError::Lost`], and the broker redelivers them.
//!
//! All state is owned by the source (`&mut self`); the only task is a watcher that flips
//! `connected` to `false` as soon as lapin reports a connection error, so health reflects a
//! loss even while the worker is busy and not polling.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer, Event};
use retouch_core::backoff::Backoff;
use retouch_core::job::Priority;
use retouch_core::queue::{JobSource, QueueCounters, QueueError};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::delivery::{AmqpDelivery, Origin};
use crate::session::{OpenError, Session, Topology};
use crate::settings::AmqpSettings;
use crate::topology::short;

/// How long [`AmqpSource::close`] waits for deliveries the broker sent before the cancel
/// took effect (they are released, not dropped).
const CANCEL_DRAIN: Duration = Duration::from_secs(5);

/// The jobs queue as a supervised [`JobSource`]. Create it with [`AmqpSource::connect`].
pub struct AmqpSource {
    settings: Arc<AmqpSettings>,
    counters: Arc<QueueCounters>,
    /// The current subscription; `None` after a loss until [`next`](JobSource::next)
    /// reconnects, and after [`shutdown`](Self::shutdown).
    consuming: Option<Consuming>,
    /// Reconnect delays; reset by a successful reconnect.
    backoff: Backoff,
    /// `close()` was called: no more deliveries, no more reconnects.
    closed: bool,
    /// Sessions opened so far (the first is not a reconnect).
    sessions: u64,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("queue", &self.settings.jobs_queue)
            .field("connected", &self.consuming.is_some())
            .field("closed", &self.closed)
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// One session's worth of consuming.
struct Consuming {
    /// The connection and the publisher-confirm channel for dead letters (rebuilt on the same
    /// connection if the broker closes it, e.g. 404 for a missing dead-letter exchange).
    session: Session,
    /// The subscriptions, the high-priority queue's first (when configured): [`next`] always
    /// takes a waiting high-priority job before a normal one.
    ///
    /// [`next`]: JobSource::next
    subscriptions: Vec<Subscription>,
    /// Flips `connected` to `false` on a connection error; aborted on drop.
    watcher: JoinHandle<()>,
}

/// One queue consumed on a channel of its own (its own prefetch).
struct Subscription {
    /// The queue.
    queue: String,
    /// The priority of its jobs.
    priority: Priority,
    /// The consuming channel (`basic.qos` per consumer, manual acks); settlements use it.
    channel: Channel,
    /// The subscription on [`channel`](Self::channel).
    consumer: Consumer,
    /// Its consumer tag, for `basic.cancel`.
    tag: ShortString,
}

impl Drop for Consuming {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Consuming {
    async fn open(settings: &AmqpSettings, counters: &Arc<QueueCounters>) -> Result<Self, OpenError> {
        let session = Session::open(settings, "consume", Topology::Declare).await?;
        let mut queues = Vec::with_capacity(2);
        if settings.has_high_priority_queue() {
            queues.push((settings.high_priority_queue.clone(), Priority::High));
        }
        queues.push((settings.jobs_queue.clone(), Priority::Normal));
        let mut subscriptions = Vec::with_capacity(queues.len());
        for (queue, priority) in queues {
            let channel = session.channel("opening a consuming channel").await?;
            // global=false: per consumer; quorum queues refuse global QoS with a connection error.
            channel
                .basic_qos(settings.prefetch_or(1), BasicQosOptions { global: false })
                .await
                .map_err(OpenError::channel("basic.qos"))?;
            let tag = ShortString::from(format!("{}-{:016x}", short(&settings.connection_name), rand::random::<u64>()));
            let consumer = channel
                .basic_consume(
                    short(&queue),
                    tag.clone(),
                    BasicConsumeOptions { no_ack: false, ..BasicConsumeOptions::default() },
                    FieldTable::default(),
                )
                .await
                .map_err(OpenError::channel("basic.consume"))?;
            subscriptions.push(Subscription { queue, priority, channel, consumer, tag });
        }

        let watcher = {
            let mut events = session.connection.events_listener();
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    if let Event::Error(e) = event {
                        counters.connected.store(false, Ordering::Relaxed);
                        warn!(error = %e, "AMQP consumer connection failed");
                        break;
                    }
                }
            })
        };
        Ok(Self { session, subscriptions, watcher })
    }
}

impl AmqpSource {
    /// Validates `settings`, connects, declares (or checks) the topology and subscribes.
    /// `counters` is shared with the metrics endpoint.
    ///
    /// The first connection is not retried: a broker that is down or misconfigured at start-up
    /// is reported to the caller (the process exits and its supervisor restarts it). After
    /// that, losses are recovered inside [`next`](JobSource::next).
    ///
    /// Must run inside a tokio runtime (lapin uses the current one).
    ///
    /// # Errors
    /// [`QueueError::Broker`] for invalid settings, an unreachable broker, or a topology that
    /// does not match (the message names the queue, the argument and the fix).
    pub async fn connect(settings: AmqpSettings, counters: Arc<QueueCounters>) -> Result<Self, QueueError> {
        settings.validate().map_err(|e| QueueError::Broker(format!("invalid AMQP settings: {e}")))?;
        let settings = Arc::new(settings);
        let consuming = Consuming::open(&settings, &counters).await?;
        counters.connected.store(true, Ordering::Relaxed);
        info!(queue = %settings.jobs_queue, prefetch = settings.prefetch_or(1), url = %settings.redacted_url(), "consuming");
        Ok(Self {
            backoff: settings.reconnect_backoff(),
            settings,
            counters,
            consuming: Some(consuming),
            closed: false,
            sessions: 1,
        })
    }

    /// The shared counters.
    pub fn counters(&self) -> &Arc<QueueCounters> {
        &self.counters
    }

    /// The settings in use.
    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// Closes the connection (after [`close`](JobSource::close) and the last settlement, at
    /// shutdown). Unsettled deliveries still held elsewhere are requeued by the broker.
    pub async fn shutdown(mut self) {
        self.closed = true;
        self.counters.connected.store(false, Ordering::Relaxed);
        if let Some(c) = self.consuming.take() {
            let _ = c.session.connection.close(200, "shutting down".into()).await;
        }
    }

    /// Drops the current session after a failure.
    fn lose_session(&mut self, why: &str) {
        self.counters.connected.store(false, Ordering::Relaxed);
        if let Some(s) = self.consuming.take() {
            warn!(queue = %self.settings.jobs_queue, reason = why, "AMQP consumer lost; reconnecting");
            // Deliveries still in flight keep their channel (and so the connection) alive;
            // a dead connection is simply dropped.
            drop(s);
        }
    }

    /// Builds a new session, backing off before each attempt; returns only on success or a
    /// permanent failure.
    async fn reconnect(&mut self) -> Result<(), QueueError> {
        loop {
            let delay = self.backoff.next_delay();
            debug!(?delay, "reconnecting after");
            tokio::time::sleep(delay).await;
            match Consuming::open(&self.settings, &self.counters).await {
                Ok(c) => {
                    self.consuming = Some(c);
                    self.sessions += 1;
                    self.backoff.reset();
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.counters.connected.store(true, Ordering::Relaxed);
                    info!(queue = %self.settings.jobs_queue, "AMQP consumer reconnected");
                    return Ok(());
                }
                Err(e) if e.is_permanent() => return Err(QueueError::Broker(format!("reconnecting: {e}"))),
                Err(e) => warn!(error = %e, "AMQP reconnect failed"),
            }
        }
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        self.counters.connected.store(false, Ordering::Relaxed);
    }
}

impl JobSource for AmqpSource {
    type Delivery = AmqpDelivery;

    async fn next(&mut self) -> Result<Option<AmqpDelivery>, QueueError> {
        loop {
            if self.closed {
                return Ok(None);
            }
            let Some(consuming) = self.consuming.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            // Biased: a waiting high-priority job is always taken first.
            let (received, index) = match consuming.subscriptions.as_mut_slice() {
                [only] => (only.consumer.next().await, 0),
                [high, normal, ..] => tokio::select! {
                    biased;
                    d = high.consumer.next() => (d, 0),
                    d = normal.consumer.next() => (d, 1),
                },
                [] => return Ok(None),
            };
            match received {
                Some(Ok(d)) => {
                    if !d.acker.usable() {
                        // Prefetched on a channel that has since died: the broker requeued it.
                        continue;
                    }
                    if let Err(e) = consuming.session.ensure_confirm().await {
                        warn!(error = %e, "could not reopen the confirm channel; dead letters will fall back to reject");
                    }
                    let subscription = &consuming.subscriptions[index];
                    return Ok(Some(AmqpDelivery::new(
                        d,
                        subscription.channel.clone(),
                        consuming.session.confirm.clone(),
                        Origin { queue: subscription.queue.clone(), priority: subscription.priority },
                        self.settings.clone(),
                        self.counters.clone(),
                    )));
                }
                Some(Err(e)) => self.lose_session(&e.to_string()),
                None if self.closed => return Ok(None),
                None => self.lose_session("the consumer was cancelled by the broker"),
            }
        }
    }

    async fn close(&mut self) -> Result<(), QueueError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.counters.connected.store(false, Ordering::Relaxed);
        let Some(consuming) = self.consuming.as_mut() else {
            return Ok(());
        };
        let mut released = 0u32;
        for subscription in &mut consuming.subscriptions {
            if let Err(e) =
                subscription.channel.basic_cancel(subscription.tag.clone(), BasicCancelOptions::default()).await
            {
                // The connection is gone: nothing more will arrive, and the broker requeued
                // whatever was unacknowledged.
                warn!(error = %e, queue = %subscription.queue, "basic.cancel failed");
                continue;
            }
            // Deliveries the broker sent before the cancel took effect, never handed out: give
            // them back now rather than hold them until the connection closes.
            while let Ok(Some(Ok(d))) = tokio::time::timeout(CANCEL_DRAIN, subscription.consumer.next()).await {
                if let Ok(true) = d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await {
                    released += 1;
                }
            }
        }
        info!(queue = %self.settings.jobs_queue, released, "consumers cancelled; deliveries in flight stay settleable");
        Ok(())
    }
}
