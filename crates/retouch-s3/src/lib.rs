//! Retouch's S3 object store: the aws-sdk-s3 implementation of
//! [`retouch_core::store::ObjectStore`] for AWS and S3-compatible stores (MinIO, Ceph RGW,
//! Cloudflare R2, s3s).
//!
//! * [`settings`]: [`S3Settings`], endpoint, region, path style, timeouts and attempts.
//! * [`store`]: [`S3Store`], the client (credential chain, checksum policy `WhenRequired`),
//!   `get`/`head`/`put`, [`S3Store::check_bucket`] for start-up and
//!   [`S3Store::put_if_absent`] for idempotent outputs.
//! * [`error`]: [`S3Error`] and [`error::classify`], the one mapping from SDK failures to
//!   [`retouch_core::store::StoreError`] (404 → not found, 403 → denied, the rest retryable).
//! * [`sync`]: [`S3Store::sync_prefix`], a resumable, verified mirror of a prefix on local disk
//!   (model weights without Hub access).
//! * `listing` (private): `s3://bucket/prefix/` parsing and the one ListObjectsV2 walk, used by
//!   [`S3Store::list_prefix`] and the sync.
//!
//! Module dependencies run one way: `sync` → `store` → `listing` → `error`.

pub mod error;
mod listing;
pub mod settings;
pub mod store;
pub mod sync;

pub use error::{CREDENTIALS_HINT, S3Error};
pub use settings::S3Settings;
pub use store::{PutOutcome, S3Store};
pub use sync::{MANIFEST_FILE, SyncReport};
