//! Errors: [`S3Error`] for this crate's own operations, and [`classify`], the one place where an
//! SDK failure becomes a [`StoreError`] (the seam's retry class).
//!
//! The rules, in order:
//!
//! * service answered 404, `NoSuchKey`, `NoSuchBucket`, `NotFound` → [`StoreError::NotFound`];
//! * service answered 403, `AccessDenied`, `SignatureDoesNotMatch`, `InvalidAccessKeyId`,
//!   `NotSignedUp`, `AuthorizationHeaderMalformed` (wrong region), `InvalidToken`, or no
//!   credentials could be found → [`StoreError::Denied`], whose message says "check the S3
//!   credentials";
//! * 5xx, throttling codes, timeouts, connection (dispatch) failures, unparseable responses,
//!   credential providers that timed out or failed (IMDS/STS hiccups) → [`StoreError::Transient`];
//! * a request the SDK could not build (bad metadata header, invalid bucket name for the
//!   endpoint) → [`StoreError::Invalid`];
//! * any other service error → [`StoreError::Transient`] with the service's code and message: an
//!   unknown answer is left to the job's retry budget and dead-lettering rather than guessed
//!   permanent.

use std::error::Error as StdError;
use std::path::PathBuf;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use retouch_core::store::StoreError;

/// The hint every [`StoreError::Denied`] message carries.
pub const CREDENTIALS_HINT: &str = "check the S3 credentials";

/// Why an operation of this crate (other than the [`retouch_core::store::ObjectStore`] calls,
/// which return [`StoreError`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The settings cannot work (zero attempts, no region, bad endpoint).
    #[error("invalid S3 settings: {0}")]
    Settings(String),
    /// An S3 call failed; the [`StoreError`] says whether a retry may help.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A location or key this crate refuses (not `s3://`, a key that would escape the cache
    /// directory).
    #[error("invalid location: {0}")]
    Invalid(String),
    /// A local file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `write`, `rename`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A downloaded object does not match what the store announced (size or MD5 ETag).
    #[error("s3://{bucket}/{key}: {message}")]
    Integrity {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What did not match.
        message: String,
    },
}

impl S3Error {
    /// Whether a retry may succeed (transient store failures and corrupt downloads).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Integrity { .. } => true,
            Self::Settings(_) | Self::Invalid(_) | Self::Io { .. } => false,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}

const NOT_FOUND_CODES: &[&str] = &["NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion"];
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "NotSignedUp",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "AccountProblem",
    "AllAccessDisabled",
];

/// Turns an SDK failure of the call described by `what` (e.g. `GetObject s3://b/k`) into the
/// seam's [`StoreError`]. The single classification point of the crate: see the module doc for
/// the rules.
pub fn classify<E>(what: &str, err: &SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or("");
            let message = service.err().message().unwrap_or("");
            let detail = match (code, message) {
                ("", "") => format!("HTTP {status}"),
                (code, "") => format!("HTTP {status} {code}"),
                (code, message) => format!("HTTP {status} {code}: {message}"),
            };
            if NOT_FOUND_CODES.contains(&code) || (status == 404 && !DENIED_CODES.contains(&code)) {
                StoreError::NotFound(format!("{what}: {detail}"))
            } else if DENIED_CODES.contains(&code) || status == 403 {
                StoreError::Denied(format!("{what}: {detail}; {CREDENTIALS_HINT} (keys, region, bucket policy)"))
            } else {
                StoreError::Transient(format!("{what}: {detail}"))
            }
        }
        SdkError::TimeoutError(_) => StoreError::Transient(format!("{what}: timed out ({})", DisplayErrorContext(err))),
        SdkError::DispatchFailure(failure) => {
            let kind = if failure.is_timeout() { "connect timeout" } else { "could not reach the store" };
            StoreError::Transient(format!("{what}: {kind} ({})", DisplayErrorContext(err)))
        }
        SdkError::ResponseError(_) => {
            StoreError::Transient(format!("{what}: unreadable response ({})", DisplayErrorContext(err)))
        }
        SdkError::ConstructionFailure(_) => match credentials_error(err) {
            Some(CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)) => {
                StoreError::Denied(format!(
                    "{what}: no usable credentials; {CREDENTIALS_HINT} ({})",
                    DisplayErrorContext(err)
                ))
            }
            Some(_) => {
                StoreError::Transient(format!("{what}: the credentials provider failed ({})", DisplayErrorContext(err)))
            }
            None => StoreError::Invalid(format!("{what}: request could not be built ({})", DisplayErrorContext(err))),
        },
        // `SdkError` is non-exhaustive: anything new is treated as passing.
        _ => StoreError::Transient(format!("{what}: {}", DisplayErrorContext(err))),
    }
}

/// The credentials provider's error somewhere in the chain of `err`, if that is what failed.
fn credentials_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a CredentialsError> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<CredentialsError>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_sdk_s3::primitives::SdkBody;
    use aws_smithy_runtime_api::http::StatusCode;

    use super::*;

    type Err = SdkError<GetObjectError, HttpResponse>;

    fn service(status: u16, code: &str, message: &str) -> Err {
        let mut meta = ErrorMetadata::builder();
        if !code.is_empty() {
            meta = meta.code(code);
        }
        if !message.is_empty() {
            meta = meta.message(message);
        }
        let raw = HttpResponse::new(StatusCode::try_from(status).expect("valid status"), SdkBody::empty());
        SdkError::service_error(GetObjectError::generic(meta.build()), raw)
    }

    fn class(err: &Err) -> StoreError {
        classify("GetObject s3://b/k", err)
    }

    #[test]
    fn not_found_by_code_or_status() {
        for err in [
            service(404, "NoSuchKey", "The specified key does not exist."),
            service(404, "NoSuchBucket", "The specified bucket does not exist"),
            service(404, "", ""), // HEAD responses have no body, hence no code
            service(400, "NoSuchKey", ""),
        ] {
            let got = class(&err);
            assert!(matches!(&got, StoreError::NotFound(m) if m.starts_with("GetObject s3://b/k: HTTP")), "{got:?}");
        }
        let got = class(&service(404, "NoSuchKey", "gone"));
        assert_eq!(got, StoreError::NotFound("GetObject s3://b/k: HTTP 404 NoSuchKey: gone".into()));
    }

    #[test]
    fn denied_by_code_or_status_with_hint() {
        for err in [
            service(403, "SignatureDoesNotMatch", "The request signature we calculated does not match"),
            service(403, "InvalidAccessKeyId", ""),
            service(403, "AccessDenied", "Access Denied"),
            service(403, "NotSignedUp", ""),
            service(403, "", ""),
            service(400, "AuthorizationHeaderMalformed", "the region 'us-east-1' is wrong"),
        ] {
            let got = class(&err);
            assert!(matches!(&got, StoreError::Denied(m) if m.contains(CREDENTIALS_HINT)), "{got:?}");
            assert!(!got.is_retryable());
        }
    }

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for err in [
            service(500, "InternalError", "We encountered an internal error"),
            service(503, "SlowDown", "Please reduce your request rate"),
            service(503, "", ""),
            service(429, "TooManyRequests", ""),
        ] {
            let got = class(&err);
            assert!(got.is_retryable(), "{got:?}");
        }
    }

    #[test]
    fn other_service_errors_are_transient_with_code_and_message() {
        let got = class(&service(400, "InvalidArgument", "bad range"));
        assert_eq!(got, StoreError::Transient("GetObject s3://b/k: HTTP 400 InvalidArgument: bad range".into()));
        let got =
            class(&service(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"));
        assert!(matches!(&got, StoreError::Transient(m) if m.contains("412 PreconditionFailed")), "{got:?}");
    }

    #[test]
    fn timeouts_and_connection_failures_are_transient() {
        let timeout: Err =
            SdkError::timeout_error("operation timeout (all attempts including retries) occurred after 1s");
        assert!(matches!(class(&timeout), StoreError::Transient(m) if m.contains("timed out")));

        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let dispatch: Err = SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        assert!(matches!(class(&dispatch), StoreError::Transient(m) if m.contains("could not reach")));

        let slow: Err = SdkError::dispatch_failure(ConnectorError::timeout("connect timed out".into()));
        assert!(matches!(class(&slow), StoreError::Transient(m) if m.contains("connect timeout")));

        let raw = HttpResponse::new(StatusCode::try_from(200).expect("valid"), SdkBody::empty());
        let garbled: Err = SdkError::response_error("invalid XML", raw);
        assert!(class(&garbled).is_retryable());
    }

    #[test]
    fn missing_credentials_are_denied_but_provider_hiccups_are_transient() {
        let missing: Err = SdkError::construction_failure(CredentialsError::not_loaded("no providers in chain"));
        assert!(matches!(class(&missing), StoreError::Denied(m) if m.contains(CREDENTIALS_HINT)));

        let imds: Err = SdkError::construction_failure(CredentialsError::provider_timed_out(Duration::from_secs(1)));
        assert!(class(&imds).is_retryable());

        let bad_header: Err = SdkError::construction_failure("invalid header value for x-amz-meta-note");
        assert!(matches!(class(&bad_header), StoreError::Invalid(_)));
    }

    #[test]
    fn s3_error_retry_classes() {
        assert!(S3Error::Store(StoreError::Transient("x".into())).is_retryable());
        assert!(!S3Error::Store(StoreError::Denied("x".into())).is_retryable());
        assert!(S3Error::Integrity { bucket: "b".into(), key: "k".into(), message: "md5".into() }.is_retryable());
        assert!(!S3Error::Settings("x".into()).is_retryable());
    }
}
