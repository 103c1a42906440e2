//! [`Signer`]: the Standard Webhooks signature (<https://www.standardwebhooks.com/>), scheme
//! `v1` — HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"` with the key of a
//! `whsec_…` secret, sent base64-encoded as `webhook-signature: v1,<signature>`.
//!
//! The secret is base64 (standard alphabet, padding optional), with or without the `whsec_`
//! prefix, as the specification and its reference libraries read it. Keys shorter than
//! [`MIN_KEY_BYTES`] are refused: the specification asks for 24 to 64 random bytes.
//!
//! Neither the secret nor a signature is ever part of an error message or a `Debug` output.

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret; the base64 key follows it.
pub const SECRET_PREFIX: &str = "whsec_";

/// The shortest key accepted, in bytes (the specification's lower bound).
pub const MIN_KEY_BYTES: usize = 24;

/// The version tag of the one signature scheme this crate writes and reads.
const VERSION: &str = "v1";

/// Standard base64 that accepts the secret or a signature with or without its `=` padding
/// (the reference libraries pad before decoding, so both spellings are in use).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha256 = Hmac<Sha256>;

/// Why a webhook secret was refused. The messages never contain the secret.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SecretError {
    /// Nothing to sign with (an empty string, or only the prefix).
    #[error("the webhook secret is empty")]
    Empty,
    /// The part after the optional `whsec_` prefix is not base64.
    #[error("the webhook secret is not base64 (expected whsec_<base64 key>): {source}")]
    NotBase64 {
        /// The decoder's complaint (a position and a byte, never the secret itself).
        #[source]
        source: base64::DecodeError,
    },
    /// The key is too short to be a safe HMAC key.
    #[error(
        "the webhook secret's key is {len} bytes, at least {MIN_KEY_BYTES} are required \
         (make one with: echo whsec_$(openssl rand -base64 32))"
    )]
    TooShort {
        /// Length of the decoded key in bytes.
        len: usize,
    },
}

/// Signs (and verifies) webhook messages with one secret. Cheap to clone; `Debug` shows no
/// key material.
#[derive(Clone)]
pub struct Signer {
    /// The HMAC key: the base64-decoded secret.
    key: Vec<u8>,
}

impl Signer {
    /// Reads a secret written `whsec_<base64 key>` or as bare base64.
    ///
    /// # Errors
    /// [`SecretError`] when the secret is empty, not base64, or decodes to fewer than
    /// [`MIN_KEY_BYTES`] bytes.
    pub fn new(secret: &str) -> Result<Signer, SecretError> {
        let encoded = secret.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        if encoded.is_empty() {
            return Err(SecretError::Empty);
        }
        let key = BASE64.decode(encoded).map_err(|source| SecretError::NotBase64 { source })?;
        if key.len() < MIN_KEY_BYTES {
            return Err(SecretError::TooShort { len: key.len() });
        }
        Ok(Signer { key })
    }

    /// The `webhook-signature` header value for one message: `v1,<base64 of
    /// HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. `timestamp` is the `webhook-timestamp`
    /// header's value, in Unix seconds; `body` the exact bytes sent.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("{VERSION},{}", BASE64.encode(tag))
    }

    /// Whether a `webhook-signature` header value (a space-separated list of
    /// `<version>,<base64>`) holds a valid `v1` signature of this message. Entries of other
    /// versions and undecodable entries are skipped; the comparison is constant-time.
    ///
    /// The timestamp's age is not checked here: a receiver should also refuse timestamps far
    /// from its clock (the specification suggests 5 minutes) to stop replays.
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let mac = self.mac(id, timestamp, body);
        header.split_whitespace().filter_map(|entry| entry.split_once(',')).any(|(version, signature)| {
            version == VERSION
                && BASE64.decode(signature).is_ok_and(|signature| mac.clone().verify_slice(&signature).is_ok())
        })
    }

    /// The HMAC state after the signed content `"{id}.{timestamp}.{body}"`.
    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length; `new` guarantees a non-empty one anyway.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length; this is a bug");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("key", &format_args!("*** ({} bytes)", self.key.len())).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's test vector (also checked against the reference Python library,
    /// `standardwebhooks` 1.3.0).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_test_vector() {
        let signer = Signer::new(SECRET).expect("valid secret");
        assert_eq!(signer.sign(ID, TIMESTAMP, BODY), SIGNATURE);
        let bare = Signer::new(SECRET.trim_start_matches(SECRET_PREFIX)).expect("unprefixed secret");
        assert_eq!(bare.sign(ID, TIMESTAMP, BODY), SIGNATURE, "the prefix is optional");
    }

    #[test]
    fn verifies_only_the_signed_message() {
        let signer = Signer::new(SECRET).expect("valid secret");
        assert!(signer.verify(ID, TIMESTAMP, BODY, SIGNATURE));
        assert!(signer.verify(ID, TIMESTAMP, BODY, &format!("v2,abc v1,AAAA {SIGNATURE}")), "any entry may match");
        let unpadded = SIGNATURE.trim_end_matches('=');
        assert!(signer.verify(ID, TIMESTAMP, BODY, unpadded), "padding is optional");

        assert!(!signer.verify(ID, TIMESTAMP, br#"{"test": 2432232315}"#, SIGNATURE), "changed body");
        assert!(!signer.verify("msg_p5jXN8AQM9LWM0D4loKWxJeK", TIMESTAMP, BODY, SIGNATURE), "changed id");
        assert!(!signer.verify(ID, TIMESTAMP + 1, BODY, SIGNATURE), "changed timestamp");
        let other_versions = SIGNATURE.replacen("v1,", "v1a,", 1) + " " + &SIGNATURE.replacen("v1,", "v2,", 1);
        assert!(!signer.verify(ID, TIMESTAMP, BODY, &other_versions), "only other versions");
        assert!(!signer.verify(ID, TIMESTAMP, BODY, ""), "empty header");
        assert!(!signer.verify(ID, TIMESTAMP, BODY, "v1,not-base64!"), "undecodable signature");
        let other_key = Signer::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").expect("valid secret");
        assert!(!other_key.verify(ID, TIMESTAMP, BODY, SIGNATURE), "another key");
    }

    #[test]
    fn refuses_unusable_secrets_without_echoing_them() {
        assert_eq!(Signer::new("").err(), Some(SecretError::Empty));
        assert_eq!(Signer::new("whsec_").err(), Some(SecretError::Empty));
        let not_base64 = Signer::new("whsec_hunter2!hunter2!hunter2!hunter2!").expect_err("not base64");
        assert!(matches!(not_base64, SecretError::NotBase64 { .. }), "{not_base64:?}");
        assert!(!not_base64.to_string().contains("hunter2"), "{not_base64}");
        // 16 bytes: a valid base64 key that is too short.
        assert_eq!(Signer::new("whsec_AAAAAAAAAAAAAAAAAAAAAA==").err(), Some(SecretError::TooShort { len: 16 }));
        assert_eq!(Signer::new("AAAAAAAAAAAAAAAAAAAAAA").err(), Some(SecretError::TooShort { len: 16 }));
        assert!(Signer::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_ok(), "24 bytes is enough");
        let debug = format!("{:?}", Signer::new(SECRET).expect("valid secret"));
        assert!(!debug.contains("MfKQ"), "{debug}");
    }
}
