//! Retouch's core: the nouns and seams every other crate shares, with no runtime, broker,
//! cloud or ML dependency.
//!
//! * [`params`]: edit parameters (steps, guidance, seed, scheduler, size, output format), their
//!   defaults and validation — the contract of `retouch edit` and of the job protocol.
//! * [`imaging`]: the input policy (decode with limits, EXIF orientation, alpha onto white,
//!   Lanczos resize to a multiple of 8) and output encoding.
//! * [`editor`]: the model seam, a synchronous [`editor::Editor`] owned by one thread.

pub mod editor;
pub mod imaging;
pub mod params;
