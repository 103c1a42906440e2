//! Retouch's core: the nouns and seams every other crate shares, with no runtime, broker,
//! cloud or ML dependency.
//!
//! * [`backoff`]: [`backoff::Backoff`], the capped exponential backoff of reconnects and retries.
//! * [`params`]: edit parameters (steps, guidance, seed, scheduler, size, output format), their
//!   defaults and validation — the contract of `retouch edit` and of the job protocol.
//! * [`imaging`]: the input policy (decode with limits, EXIF orientation, alpha onto white,
//!   Lanczos resize to a multiple of 8) and output encoding.
//! * [`editor`]: the model seam, a synchronous [`editor::Editor`] owned by one thread.
//! * [`job`]: the job protocol v1 — [`job::EditJob`], [`job::JobResult`] — and validation.
//! * [`events`]: progress events ([`events::JobEvent`]) and cancel requests
//!   ([`events::CancelRequest`]).
//! * [`error`]: the protocol's error kinds and [`error::JobError`] with its retry class.
//! * [`store`]: the object-storage seam ([`store::ObjectStore`]).
//! * [`time`]: RFC 3339 timestamps for records.
//! * [`queue`]: the broker seam ([`queue::JobSource`], [`queue::Delivery`], [`queue::ResultSink`]).
//! * [`safety`]: the safety-checker policy (`auto`, `on`, `off`, `block`).

pub mod backoff;
pub mod editor;
pub mod error;
pub mod events;
pub mod imaging;
pub mod job;
pub mod params;
pub mod queue;
pub mod redact;
pub mod safety;
pub mod store;
pub mod time;
