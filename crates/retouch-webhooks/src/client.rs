//! [`WebhookClient`]: sends one webhook — a signed `POST` of a job's result JSON — with
//! retries, over one pooled HTTP/1.1 client (hyper-util's legacy client, rustls with the
//! aws-lc-rs provider and the system's root certificates).
//!
//! Every attempt re-checks the URL against the [`AllowList`] before anything is resolved or
//! connected, redirects are never followed (a `3xx` is a failed attempt: following one would
//! let an allowed host bounce the worker to a host that is not), and each attempt is bounded
//! by [`WebhookSettings::timeout`]. The signature, the id and the timestamp follow the
//! Standard Webhooks specification: the id is the same for every attempt of a message (the
//! receiver's idempotency key), the timestamp is the time of each attempt.
//!
//! There is no state between calls other than the connection pool, so [`WebhookClient::deliver`]
//! is cancel-safe: dropping its future stops the delivery (an attempt in flight is abandoned
//! and its connection closed).

use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use retouch_core::backoff::Backoff;
use url::Url;

use crate::allow::{AllowList, UrlError};
use crate::settings::WebhookSettings;
use crate::signature::{SecretError, Signer};

/// The `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("retouch-webhooks/", env!("CARGO_PKG_VERSION"));

/// How much of a response body is read (and discarded) before the response is dropped:
/// enough to let a well-behaved receiver's short answer finish so the connection can be
/// reused, little enough that a receiver cannot make the worker read forever.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Longest `webhook-id` accepted (bytes).
pub const MAX_ID_BYTES: usize = 256;

/// Why a [`WebhookClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// [`WebhookSettings::secret`] is empty: webhooks are off, there is nothing to sign with.
    #[error("webhooks are disabled (webhooks.secret is empty)")]
    Disabled,
    /// The settings do not validate ([`WebhookSettings::validate`]'s message).
    #[error("invalid [webhooks] settings: {0}")]
    Settings(String),
    /// The secret cannot be used.
    #[error("webhooks.secret: {0}")]
    Secret(#[source] SecretError),
    /// No root certificates could be loaded from the system store (install the
    /// `ca-certificates` package, or point `SSL_CERT_FILE` / `SSL_CERT_DIR` at a bundle).
    #[error("no TLS root certificates could be loaded for webhooks: {source}")]
    RootCertificates {
        /// The loader's error.
        #[source]
        source: std::io::Error,
    },
}

/// Why an attempt was not made: nothing was resolved or connected.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Refusal {
    /// The URL is not allowed ([`AllowList::check`]).
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The message id cannot be sent as a `webhook-id` header.
    #[error("webhook id {id:?} is not usable: it must be 1–{MAX_ID_BYTES} visible ASCII characters")]
    Id {
        /// The id (cut to 80 characters).
        id: String,
    },
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The receiver answered `2xx`.
    Delivered {
        /// The status code.
        status: u16,
    },
    /// The receiver answered anything else (`3xx` included: redirects are not followed).
    Rejected {
        /// The status code.
        status: u16,
    },
    /// No answer: DNS, connect, TLS or protocol error, or the timeout.
    Failed {
        /// What went wrong, with its causes.
        error: String,
    },
    /// No request was made: the URL is not on the allow-list (or not usable), or the id is
    /// not a valid header value. Retrying cannot help.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// How a [`WebhookClient::deliver`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An attempt got a `2xx`.
    Delivered,
    /// Every attempt failed and the retry window ([`WebhookSettings::retry_for`] after
    /// `first_attempt_at`) has passed.
    GaveUp,
    /// The URL (or the id) was refused: no request was made.
    Refused,
}

/// The report of a [`WebhookClient::deliver`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// How it ended.
    pub outcome: Outcome,
    /// Requests made in this call (0 when refused).
    pub attempts: u32,
    /// The most recent HTTP status received in this call, if any response came.
    pub last_status: Option<u16>,
    /// What went wrong in the last attempt (`HTTP 503 Service Unavailable`, a transport
    /// error, the timeout, or the refusal); `None` after a delivery.
    pub last_error: Option<String>,
    /// Wall time spent in this call, retry delays included.
    pub seconds: f64,
}

/// The HTTP client type: hyper-util's pooled client over rustls or plain TCP.
type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Sends webhooks. Build one per process and share it (`&self` methods; the connection pool
/// is inside): the number of deliveries in progress is bounded by the caller (typically a
/// semaphore of [`WebhookSettings::concurrency`] permits).
pub struct WebhookClient {
    /// The pooled HTTP client; never follows redirects.
    http: HttpsClient,
    /// Signs every request.
    signer: Signer,
    /// Which hosts may be called.
    allow: AllowList,
    /// Whether `http://` URLs are allowed.
    allow_http: bool,
    /// Limit on one attempt.
    timeout: Duration,
    /// How long after the first attempt retries continue.
    retry_for: Duration,
    /// Delays between attempts.
    backoff: Backoff,
}

impl WebhookClient {
    /// Builds the client from validated settings: the signer, the allow-list, and the HTTP
    /// client (HTTP/1.1, TLS 1.2+ with the system's roots, `https` only unless
    /// [`WebhookSettings::allow_http`], connect bounded by the attempt timeout, up to
    /// [`WebhookSettings::concurrency`] idle connections per host kept for 90 s).
    ///
    /// # Errors
    /// [`WebhookError::Disabled`] without a secret, [`WebhookError::Settings`] when the
    /// settings do not validate, [`WebhookError::RootCertificates`] when the system has no
    /// usable root certificates.
    pub fn new(settings: &WebhookSettings) -> Result<WebhookClient, WebhookError> {
        if !settings.enabled() {
            return Err(WebhookError::Disabled);
        }
        settings.validate().map_err(WebhookError::Settings)?;
        let signer = Signer::new(&settings.secret).map_err(WebhookError::Secret)?;

        let mut tcp = HttpConnector::new();
        // The https connector below hands both schemes to this one; it decides which it allows.
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(settings.timeout));
        tcp.set_nodelay(true);
        // Both of rustls's providers are compiled into this workspace, so the process-wide
        // default is ambiguous: name the one the rest of the workspace uses.
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|source| WebhookError::RootCertificates { source })?;
        let connector = if settings.allow_http {
            builder.https_or_http().enable_http1().wrap_connector(tcp)
        } else {
            builder.https_only().enable_http1().wrap_connector(tcp)
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(settings.concurrency)
            .build(connector);

        Ok(WebhookClient {
            http,
            signer,
            allow: settings.allow_list(),
            allow_http: settings.allow_http,
            timeout: settings.timeout,
            retry_for: settings.retry_for,
            backoff: settings.backoff(),
        })
    }

    /// One signed `POST` of `body` to `url`: `Content-Type: application/json`, `User-Agent:
    /// retouch-webhooks/<version>`, `webhook-id: <id>`, `webhook-timestamp: <now>`,
    /// `webhook-signature: v1,<signature>`. The URL is checked against the allow-list first;
    /// a refused one is never resolved or connected to. The whole attempt, up to the status
    /// line and headers, is bounded by [`WebhookSettings::timeout`]; then up to
    /// [`MAX_RESPONSE_BODY`] of the body is read within what is left of it and discarded.
    pub async fn attempt(&self, url: &Url, id: &str, body: &[u8]) -> Attempt {
        let uri = match self.prepare(url, id) {
            Ok(uri) => uri,
            Err(reason) => return Attempt::Refused { reason },
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let request = match self.request(uri, id, timestamp, body) {
            Ok(request) => request,
            Err(error) => return Attempt::Failed { error },
        };
        let response = match tokio::time::timeout_at(deadline, self.http.request(request)).await {
            Err(_) => return Attempt::Failed { error: format!("no response within {:?}", self.timeout) },
            Ok(Err(e)) => return Attempt::Failed { error: error_chain(&e) },
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        // Best effort: the status decides; a slow or long body only costs the connection.
        let _ = tokio::time::timeout_at(deadline, drain(response.into_body())).await;
        if status.is_success() {
            Attempt::Delivered { status: status.as_u16() }
        } else {
            Attempt::Rejected { status: status.as_u16() }
        }
    }

    /// [`attempt`](Self::attempt) until one gets a `2xx`, the URL is refused, or
    /// [`WebhookSettings::retry_for`] has passed since `first_attempt_at` — the time of the
    /// message's first attempt, which the caller keeps with the message so that a redelivered
    /// message continues the same window. Every `non-2xx` answer and every transport error or
    /// timeout is retried after the next [`WebhookSettings::backoff`] delay (the last delay is
    /// shortened to end with the window, so the final attempt happens when it closes). At
    /// least one attempt is made even when the window has already passed. Each failed attempt
    /// is logged at `warn` with the host, the status or error, the attempt number and the next
    /// delay.
    ///
    /// Cancel-safe: dropping the future stops the delivery.
    pub async fn deliver(&self, url: &Url, id: &str, body: &[u8], first_attempt_at: SystemTime) -> Delivery {
        let started = Instant::now();
        let host = url.host_str().unwrap_or_default();
        let mut report =
            Delivery { outcome: Outcome::GaveUp, attempts: 0, last_status: None, last_error: None, seconds: 0.0 };
        loop {
            let attempt = self.attempt(url, id, body).await;
            let (status, error) = match attempt {
                Attempt::Delivered { status } => {
                    report.attempts += 1;
                    report.outcome = Outcome::Delivered;
                    report.last_status = Some(status);
                    report.last_error = None;
                    break;
                }
                Attempt::Refused { reason } => {
                    tracing::warn!(host, error = %reason, "webhook refused: no request made");
                    report.outcome = Outcome::Refused;
                    report.last_error = Some(reason.to_string());
                    break;
                }
                Attempt::Rejected { status } => {
                    let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason());
                    let error = match reason {
                        Some(reason) => format!("HTTP {status} {reason}"),
                        None => format!("HTTP {status}"),
                    };
                    report.last_status = Some(status);
                    (Some(status), error)
                }
                Attempt::Failed { error } => (None, error),
            };
            report.attempts += 1;
            let attempt = report.attempts;
            let elapsed = SystemTime::now().duration_since(first_attempt_at).unwrap_or_default();
            let remaining = self.retry_for.saturating_sub(elapsed);
            if remaining.is_zero() {
                tracing::warn!(
                    host,
                    status,
                    error = %error,
                    attempt,
                    retry_for = ?self.retry_for,
                    "webhook attempt failed; giving up, the retry window has passed"
                );
                report.last_error = Some(error);
                break;
            }
            let delay = self.backoff.delay(attempt - 1).min(remaining);
            tracing::warn!(host, status, error = %error, attempt, next_delay = ?delay, "webhook attempt failed; will retry");
            report.last_error = Some(error);
            tokio::time::sleep(delay).await;
        }
        report.seconds = started.elapsed().as_secs_f64();
        report
    }

    /// The allow-list check and the id check: the request URI, or why no request may be made.
    fn prepare(&self, url: &Url, id: &str) -> Result<Uri, Refusal> {
        let url = self.allow.check(url.as_str(), self.allow_http)?;
        let id_ok = !id.is_empty() && id.len() <= MAX_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            return Err(Refusal::Id { id: id.chars().take(80).collect() });
        }
        url.as_str().parse::<Uri>().map_err(|e| {
            Refusal::Url(UrlError::Unparsable {
                url: url.as_str().chars().take(200).collect(),
                reason: format!("not accepted by the HTTP client: {e}"),
            })
        })
    }

    /// The signed request. Errors only on values the checks in `prepare` already exclude.
    fn request(&self, uri: Uri, id: &str, timestamp: u64, body: &[u8]) -> Result<Request<Full<Bytes>>, String> {
        let signature = self.signer.sign(id, timestamp, body);
        Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::copy_from_slice(body)))
            // The message would name the bad header, never its value.
            .map_err(|e| format!("could not build the request: {e}"))
    }
}

impl fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookClient")
            .field("signer", &self.signer)
            .field("allow", &self.allow)
            .field("allow_http", &self.allow_http)
            .field("timeout", &self.timeout)
            .field("retry_for", &self.retry_for)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Reads and discards up to [`MAX_RESPONSE_BODY`] bytes of a response body; stops early at its
/// end or an error.
async fn drain(mut body: Incoming) {
    let mut read = 0usize;
    while read <= MAX_RESPONSE_BODY {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) | None => return,
        }
    }
}

/// An error and its causes, `: `-separated (hyper's top-level messages say little alone).
fn error_chain(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}
