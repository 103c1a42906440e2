//! [`S3Settings`]: where the store is and how long a call may take. Plain data that is also the
//! `[s3]` section of the worker's configuration file (it deserializes straight from it; every
//! default is here); [`crate::S3Store::new`] turns it into an SDK client.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// How to reach an S3(-compatible) store and the time budget of each call.
///
/// The defaults ([`S3Settings::default`]) suit AWS S3 with the region taken from the
/// environment: no custom endpoint, virtual-hosted addressing, 3 s to connect, 60 s per
/// attempt, 300 s per call, 5 attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// A custom endpoint (`http://minio:9000`, `https://<account>.r2.cloudflarestorage.com`,
    /// a Ceph RGW, an s3s test server). `None` talks to AWS and lets the SDK resolve the
    /// regional endpoint (or take `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` from the
    /// environment). Almost every non-AWS store also needs path-style addressing, which is what
    /// an unset [`force_path_style`](Self::force_path_style) gives with an endpoint. In TOML an
    /// empty string means `None`.
    #[serde(deserialize_with = "empty_is_none", serialize_with = "none_is_empty")]
    pub endpoint: Option<String>,
    /// Signing region. AWS: the bucket's region (a wrong one gets `301`/`400
    /// AuthorizationHeaderMalformed`); MinIO/Ceph/s3s: usually `us-east-1`; R2: `auto`. Empty
    /// means the SDK's region chain: `AWS_REGION`, then the profile, then IMDS.
    pub region: String,
    /// `true` addresses objects as `endpoint/bucket/key` instead of `bucket.endpoint/key`.
    /// Required by MinIO, Ceph and s3s (no wildcard DNS); leave `false` for AWS, where path
    /// style is deprecated. Unset: `true` exactly when [`endpoint`](Self::endpoint) is set
    /// ([`path_style`](Self::path_style)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_path_style: Option<bool>,
    /// TCP + TLS connect timeout. Keep it short (1–5 s): a connect that takes longer is a dead
    /// endpoint, and the attempt is retried. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Budget of a whole call, retries and back-off included. For `get` it also bounds reading
    /// the body (the SDK's own timeouts stop at the response headers), so size it for the
    /// largest input at the slowest bandwidth you accept: 300 s is generous for images.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Budget of one attempt up to the response headers; a slow attempt is abandoned and
    /// retried while [`operation_timeout`](Self::operation_timeout) allows. Uploads of large
    /// outputs need it above `size / bandwidth`. In [`crate::S3Store::sync_prefix`] it is also
    /// the longest wait for the next chunk of a body (a stalled download fails after it).
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Attempts per call (1 = no retries), with the SDK's jittered exponential back-off on
    /// timeouts, throttling, 5xx and connection errors. 3–5 rides out a store restart; more only
    /// delays the job's own retry through the broker. Must be at least 1. Default 5.
    pub max_attempts: u32,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: String::new(),
            force_path_style: None,
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(300),
            attempt_timeout: Duration::from_secs(60),
            max_attempts: 5,
        }
    }
}

impl S3Settings {
    /// Path-style addressing as used: [`force_path_style`](Self::force_path_style), else
    /// whether a custom endpoint is set.
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint.is_some())
    }

    /// Checks the values the SDK would reject late or silently misuse.
    ///
    /// # Errors
    /// A message naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("operation_timeout", self.operation_timeout),
            ("attempt_timeout", self.attempt_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{name} must be above zero"));
            }
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!("endpoint {endpoint:?}: expected an http:// or https:// URL"));
        }
        Ok(())
    }
}

fn empty_is_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(deserializer)?;
    Ok(value.filter(|v| !v.is_empty()))
}

#[expect(clippy::ref_option, reason = "serde's serialize_with signature")]
fn none_is_empty<S: serde::Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(S3Settings::default().validate(), Ok(()));
        assert!(!S3Settings::default().path_style());
    }

    #[test]
    fn deserializes_from_a_config_section() {
        let s: S3Settings =
            toml::from_str("endpoint = \"http://minio:9000\"\noperation_timeout = \"90s\"\n").expect("valid");
        assert_eq!(s.endpoint.as_deref(), Some("http://minio:9000"));
        assert!(s.path_style(), "a custom endpoint defaults to path style");
        assert_eq!(s.operation_timeout, Duration::from_secs(90));
        assert_eq!(s.max_attempts, S3Settings::default().max_attempts);
        let aws: S3Settings = toml::from_str("endpoint = \"\"\nforce_path_style = true\n").expect("valid");
        assert_eq!((aws.endpoint.as_deref(), aws.path_style()), (None, true));
        assert!(toml::from_str::<S3Settings>("endpont = \"x\"\n").is_err(), "unknown keys are errors");
    }

    #[test]
    fn rejects_zero_attempts_timeouts_and_bad_endpoints() {
        let base = S3Settings::default();
        let zero_attempts = S3Settings { max_attempts: 0, ..base.clone() };
        assert!(zero_attempts.validate().expect_err("invalid").contains("max_attempts"));
        let zero_timeout = S3Settings { attempt_timeout: Duration::ZERO, ..base.clone() };
        assert!(zero_timeout.validate().expect_err("invalid").contains("attempt_timeout"));
        let bad_endpoint = S3Settings { endpoint: Some("minio:9000".into()), ..base };
        assert!(bad_endpoint.validate().expect_err("invalid").contains("http://"));
    }
}
