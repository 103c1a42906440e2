//! [`S3Store`]: the aws-sdk-s3 implementation of [`retouch_core::store::ObjectStore`], with a
//! start-up check ([`S3Store::check_bucket`]) and a conditional write
//! ([`S3Store::put_if_absent`]).
//!
//! The client is configured for S3-compatible stores as much as for AWS: custom endpoint and
//! path-style addressing, checksums only where an operation requires them (the SDK's default
//! CRC32 headers and `aws-chunked` bodies are rejected by R2, older MinIO, OVH, GCS and others),
//! explicit timeouts and retries. Every SDK failure goes through [`crate::error::classify`].

use std::collections::BTreeMap;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::primitives::ByteStream;
use retouch_core::job::ObjectUrl;
use retouch_core::store::{ObjectMeta, ObjectStore, StoreError};
use tokio::time::Instant;

use crate::error::{S3Error, classify};
use crate::listing::{list_objects, parse_prefix};
use crate::settings::S3Settings;

/// An S3 bucket family behind one endpoint and one set of credentials. Cheap to clone (the SDK
/// client is reference-counted); share one per process.
#[derive(Clone, Debug)]
pub struct S3Store {
    pub(crate) client: Client,
    pub(crate) settings: S3Settings,
    /// The region actually used (from the settings or the SDK's region chain), for messages.
    region: String,
}

/// What [`S3Store::put_if_absent`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and was written.
    Created,
    /// An object already existed under the key (`412 Precondition Failed`); nothing was written.
    AlreadyExists,
}

impl S3Store {
    /// A store using the SDK's standard credential chain: `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), the shared profile files, web identity
    /// (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`: EKS IRSA), the container endpoint (ECS,
    /// EKS Pod Identity), then IMDSv2. Credentials are resolved lazily, on the first call: use
    /// [`check_bucket`](Self::check_bucket) at start-up to fail early.
    ///
    /// # Errors
    /// [`S3Error::Settings`] when the settings are invalid or no region can be found.
    pub async fn new(settings: S3Settings) -> Result<Self, S3Error> {
        Self::build(settings, None).await
    }

    /// A store with fixed credentials (tests, or keys given explicitly in the configuration);
    /// nothing else of the credential chain is consulted.
    ///
    /// # Errors
    /// [`S3Error::Settings`] when the settings are invalid or no region can be found.
    pub async fn with_static_credentials(
        settings: S3Settings,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Result<Self, S3Error> {
        let credentials = Credentials::new(access_key, secret_key, None, None, "retouch-static");
        Self::build(settings, Some(credentials)).await
    }

    async fn build(settings: S3Settings, credentials: Option<Credentials>) -> Result<Self, S3Error> {
        settings.validate().map_err(S3Error::Settings)?;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .operation_timeout(settings.operation_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts))
            // S3-compatible stores reject the checksum headers and aws-chunked bodies that are
            // the SDK's default since 1.69; AWS accepts either.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map(ToString::to_string)
            .ok_or_else(|| S3Error::Settings("no region: set the S3 region in the settings or AWS_REGION".into()))?;
        let mut config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.path_style());
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let client = Client::from_conf(config.build());
        tracing::debug!(endpoint = ?settings.endpoint, %region, path_style = settings.path_style(), "S3 client ready");
        Ok(Self { client, settings, region })
    }

    /// The underlying SDK client, for calls this crate does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The settings the store was built with.
    pub fn settings(&self) -> &S3Settings {
        &self.settings
    }

    /// Checks that `bucket` exists and the credentials may use it (`HeadBucket`). Call it at
    /// start-up: wrong keys, a wrong region or a missing bucket then stop the worker with a clear
    /// message before any job is taken.
    ///
    /// # Errors
    /// [`S3Error::Store`] with [`StoreError::NotFound`] (no such bucket), [`StoreError::Denied`]
    /// (credentials or permissions) or [`StoreError::Transient`] (store unreachable).
    pub async fn check_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        let endpoint = self.settings.endpoint.as_deref().unwrap_or("AWS");
        let what = format!("HeadBucket {bucket:?} at {endpoint} (region {})", self.region);
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(err) => Err(match classify(&what, &err) {
                StoreError::NotFound(m) => StoreError::NotFound(format!("bucket {bucket:?} does not exist ({m})")),
                other => other,
            }
            .into()),
        }
    }

    /// Every object under `s3://bucket/prefix/` (`s3://bucket` for the whole bucket), in key
    /// order, paginated; "directory" markers (keys ending in `/`) are skipped. Used to submit a
    /// campaign from a prefix.
    ///
    /// # Errors
    /// [`S3Error::Invalid`] for a malformed prefix; classified storage errors otherwise.
    pub async fn list_prefix(&self, url_prefix: &str) -> Result<Vec<(ObjectUrl, u64)>, S3Error> {
        let (bucket, prefix) = parse_prefix(url_prefix)?;
        let objects = list_objects(&self.client, &bucket, &prefix).await?;
        Ok(objects
            .into_iter()
            .map(|o| (ObjectUrl { scheme: "s3".into(), bucket: bucket.clone(), key: o.key }, o.size))
            .collect())
    }

    /// Writes an object only if none exists under the key (`If-None-Match: *`): the idempotent
    /// output write of a redelivered job. Stores without conditional writes ignore the header
    /// and overwrite, which is still correct for deterministic outputs.
    ///
    /// # Errors
    /// As [`ObjectStore::put`]; `409 ConditionalRequestConflict` (a concurrent write) is
    /// [`StoreError::Transient`].
    pub async fn put_if_absent(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<PutOutcome, StoreError> {
        check_scheme(url)?;
        let request = self.put_request(url, body, content_type, metadata).if_none_match("*");
        match request.send().await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(err) if err.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(PutOutcome::AlreadyExists),
            Err(err) => Err(classify(&format!("PutObject (If-None-Match) {url}"), &err)),
        }
    }

    fn put_request(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let mut request = self
            .client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        for (name, value) in metadata {
            request = request.metadata(name, value);
        }
        request
    }
}

/// Refuses locations that are not `s3://`.
fn check_scheme(url: &ObjectUrl) -> Result<(), StoreError> {
    if url.scheme == "s3" {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{url}: the S3 store only serves s3:// locations")))
    }
}

/// Reads a body of at most `max_bytes` before `deadline`. `announced` is the `Content-Length`,
/// used to size the buffer (never beyond the limit).
pub(crate) async fn read_limited(
    mut body: ByteStream,
    what: &str,
    announced: Option<u64>,
    max_bytes: u64,
    deadline: Instant,
) -> Result<Vec<u8>, StoreError> {
    let capacity = usize::try_from(announced.unwrap_or(0).min(max_bytes)).unwrap_or(0);
    let read = async {
        let mut buf = Vec::with_capacity(capacity);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Transient(format!("{what}: reading the body failed: {e}")))?;
            let size = (buf.len() + chunk.len()) as u64;
            if size > max_bytes {
                // Dropping the stream closes the connection: the rest is never downloaded.
                return Err(StoreError::TooLarge { size, limit: max_bytes });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Transient(format!("{what}: the body was not read within the operation timeout"))),
    }
}

fn non_negative(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

impl ObjectStore for S3Store {
    async fn get(&self, url: &ObjectUrl, max_bytes: u64) -> Result<Vec<u8>, StoreError> {
        check_scheme(url)?;
        // The SDK's operation timeout stops at the response headers; the body gets what is left.
        let deadline = Instant::now() + self.settings.operation_timeout;
        let what = format!("GetObject {url}");
        let output = self
            .client
            .get_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .map_err(|err| classify(&what, &err))?;
        let announced = non_negative(output.content_length);
        if let Some(size) = announced
            && size > max_bytes
        {
            return Err(StoreError::TooLarge { size, limit: max_bytes });
        }
        read_limited(output.body, &what, announced, max_bytes, deadline).await
    }

    async fn head(&self, url: &ObjectUrl) -> Result<Option<ObjectMeta>, StoreError> {
        check_scheme(url)?;
        let what = format!("HeadObject {url}");
        let output = match self.client.head_object().bucket(&url.bucket).key(&url.key).send().await {
            Ok(output) => output,
            // A HEAD answer has no body: a missing bucket is also a plain 404 and reads as `None`.
            Err(err) => {
                return match classify(&what, &err) {
                    StoreError::NotFound(_) => Ok(None),
                    other => Err(other),
                };
            }
        };
        let metadata =
            output.metadata.unwrap_or_default().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        Ok(Some(ObjectMeta { size: non_negative(output.content_length).unwrap_or(0), etag: output.e_tag, metadata }))
    }

    async fn put(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        check_scheme(url)?;
        let size = body.len();
        self.put_request(url, body, content_type, metadata)
            .send()
            .await
            .map_err(|err| classify(&format!("PutObject {url}"), &err))?;
        tracing::debug!(%url, size, content_type, "stored object");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn read_limited_accepts_bodies_up_to_the_limit() {
        let body = ByteStream::from(vec![7u8; 100]);
        let got = read_limited(body, "t", None, 100, deadline()).await;
        assert_eq!(got, Ok(vec![7u8; 100]));
    }

    #[tokio::test]
    async fn read_limited_stops_at_the_limit_without_content_length() {
        let body = ByteStream::from(vec![7u8; 100]);
        let got = read_limited(body, "t", None, 99, deadline()).await;
        assert_eq!(got, Err(StoreError::TooLarge { size: 100, limit: 99 }));
    }

    /// A body whose next frame never comes (a stalled server).
    struct Stalled;

    impl http_body::Body for Stalled {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn read_limited_times_out_on_a_stalled_body() {
        let body = ByteStream::new(aws_sdk_s3::primitives::SdkBody::from_body_1_x(Stalled));
        let soon = Instant::now() + Duration::from_millis(50);
        let got = read_limited(body, "GetObject s3://b/k", None, 100, soon).await;
        assert!(matches!(&got, Err(StoreError::Transient(m)) if m.contains("operation timeout")), "{got:?}");
    }

    #[test]
    fn only_s3_urls_are_served() {
        let file = ObjectUrl::parse("file:///tmp/x.png").expect("valid url");
        assert!(matches!(check_scheme(&file), Err(StoreError::Invalid(m)) if m.contains("s3://")));
        let s3 = ObjectUrl::parse("s3://bucket/x.png").expect("valid url");
        assert_eq!(check_scheme(&s3), Ok(()));
    }
}
