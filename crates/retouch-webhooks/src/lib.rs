//! Retouch's webhooks: a job's result JSON `POST`ed to the submitter's HTTPS endpoint, signed
//! as the Standard Webhooks specification says (<https://www.standardwebhooks.com/>), to hosts
//! on an allow-list only, retried with backoff for a bounded window.
//!
//! * [`settings`]: [`WebhookSettings`], the `[webhooks]` section (allow-list, secret,
//!   timeouts, retries), with a redacting `Debug`.
//! * [`allow`]: [`AllowList`], the host/port gate every URL passes before any connection, and
//!   [`UrlError`], why a URL is refused.
//! * [`signature`]: [`Signer`], the `v1` HMAC-SHA256 signature of `id.timestamp.body` and its
//!   constant-time verification, and [`SecretError`].
//! * [`client`]: [`WebhookClient`], one pooled HTTP client; [`WebhookClient::attempt`] (one
//!   signed `POST`) and [`WebhookClient::deliver`] (attempts until a `2xx` or the retry window
//!   ends), reported as [`Attempt`] and [`Delivery`].
//!
//! This crate has no broker code: the relay that consumes the webhook queue calls
//! [`WebhookClient::deliver`] and decides what to acknowledge. Everything async must run inside
//! a tokio runtime.

pub mod allow;
pub mod client;
pub mod settings;
pub mod signature;

pub use allow::{AllowList, UrlError};
pub use client::{Attempt, Delivery, Outcome, Refusal, WebhookClient, WebhookError};
pub use settings::WebhookSettings;
pub use signature::{SecretError, Signer};
