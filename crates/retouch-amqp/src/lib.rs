//! Retouch's RabbitMQ broker, on lapin: the job protocol's topology, the jobs queue as a
//! [`JobSource`](retouch_core::queue::JobSource), and confirmed publishing of results and jobs.
//!
//! * [`settings`]: [`AmqpSettings`], names and tuning, with a redacting `Debug`.
//! * [`topology`]: [`declare_topology`], idempotent declarations and the clear error for a
//!   queue that exists with other arguments.
//! * [`source`]: [`AmqpSource`], one supervised connection: consume with manual acks,
//!   reconnect with backoff, `close()` by `basic.cancel`.
//! * [`delivery`]: [`AmqpDelivery`], attempts from `x-delivery-count`, and ack / retry
//!   (reject) / release (nack) / dead-letter (confirmed publish with reason headers).
//! * [`publisher`]: [`AmqpPublisher`], results to the topic exchange and `reply_to` (an
//!   unroutable result is counted, not fatal), jobs with pipelined confirms.
//! * [`admin`]: [`Admin`], a campaign's results queue and dead-letter listing / re-drive.
//!
//! Written against RabbitMQ 3.10.8 semantics and correct on 4.x: explicit delivery limit and
//! dead-letter exchange, per-consumer QoS, reject (not nack) to spend an attempt. Everything
//! must run inside a tokio runtime.

pub mod admin;
mod connection;
pub mod delivery;
pub mod publisher;
pub mod settings;
pub mod source;
pub mod topology;

pub use admin::{Admin, DeadLetter, Disposition, PassSummary, campaign_queue};
pub use delivery::AmqpDelivery;
pub use publisher::{AmqpPublisher, JobPublishOptions, OutgoingJob};
pub use settings::AmqpSettings;
pub use source::AmqpSource;
pub use topology::{TopologyError, declare_topology};
