//! Retouch's RabbitMQ broker, on lapin: all of the project's broker I/O — the job protocol's
//! topology, the jobs queue as a [`JobSource`](retouch_core::queue::JobSource), confirmed
//! publishing of results, jobs and dead letters, and the operator tools.
//!
//! * [`settings`]: [`AmqpSettings`], names and tuning, with a redacting `Debug`; the reconnect
//!   [`Backoff`](retouch_core::backoff::Backoff).
//! * [`topology`]: every declaration — [`declare_topology`] (idempotent, with the clear error
//!   for a queue that exists with other arguments) and [`declare_campaign_queue`].
//! * `session` (private): the one way to open the broker — connection, topology,
//!   publisher-confirm channel — and whether a failed open is worth retrying.
//! * [`confirm`]: the one confirmed publish (`mandatory`, confirms, timeout; nack and
//!   `basic.return` are errors the caller can tell apart).
//! * [`source`]: [`AmqpSource`], one supervised session: consume with manual acks, reconnect
//!   with backoff, `close()` by `basic.cancel`.
//! * [`delivery`]: [`AmqpDelivery`], attempts from `x-delivery-count`, and ack / retry
//!   (reject) / release (nack) / dead-letter (confirmed publish with reason headers).
//! * [`publisher`]: [`AmqpPublisher`], results to the topic exchange and `reply_to` (an
//!   unroutable result is counted, not fatal), jobs with pipelined confirms.
//! * [`admin`]: [`Admin`], a campaign's results queue (declare, consume through
//!   [`ResultsConsumer`], delete) and dead-letter listing / re-drive.
//! * [`cancels`]: [`CancelFeed`], the cancel stream read from its start, caught up before the
//!   first job.
//! * [`webhooks`]: [`WebhookQueue`], the durable queue of webhook deliveries the relay
//!   consumes (ack when delivered, dead letter with the last status when given up).
//! * [`results`]: [`ResultsConsumer`], a results queue as a stream for `retouch watch`.
//!
//! Written against RabbitMQ 3.10.8 semantics and correct on 4.x: explicit delivery limit and
//! dead-letter exchange, per-consumer QoS, reject (not nack) to spend an attempt. Everything
//! must run inside a tokio runtime.

pub mod admin;
pub mod cancels;
pub mod confirm;
pub mod delivery;
pub mod publisher;
pub mod results;
mod session;
pub mod settings;
pub mod source;
pub mod topology;
pub mod webhooks;

pub use admin::{Admin, DeadLetter, Disposition, PassSummary};
pub use cancels::{CancelFeed, ReceivedCancel};
pub use confirm::PublishError;
pub use delivery::AmqpDelivery;
pub use publisher::{AmqpPublisher, HEADER_WEBHOOK_URL, JobPublishOptions, OutgoingJob};
pub use results::{ResultMessage, ResultsConsumer};
pub use settings::AmqpSettings;
pub use source::AmqpSource;
pub use topology::{TopologyError, campaign_queue, declare_campaign_queue, declare_topology};
pub use webhooks::{WebhookMessage, WebhookQueue};
