//! [`WebhookClient`] against real HTTP receivers on ephemeral local ports: retries until a
//! `2xx` with independently verified signatures, redirects not followed, refused hosts never
//! contacted, the attempt timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use retouch_webhooks::{Attempt, Outcome, WebhookClient, WebhookSettings};
use sha2::Sha256;
use tokio::net::TcpListener;
use url::Url;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BODY: &[u8] = br#"{"job_id":"j-1","status":"succeeded","output":{"key":"out/j-1.png"}}"#;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    user_agent: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(request: &Request<Incoming>, name: &str) -> String {
        request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }
}

/// A hyper HTTP/1.1 server on 127.0.0.1, port 0, answering the n-th request (from 0) with
/// `respond(n)` and recording every request.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    async fn start(respond: impl Fn(usize) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond = Arc::new(respond);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (seen, respond) = (seen2.clone(), respond.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (seen, respond) = (seen.clone(), respond.clone());
                    async move {
                        let mut record = Seen {
                            id: Seen::header(&request, "webhook-id"),
                            timestamp: Seen::header(&request, "webhook-timestamp"),
                            signature: Seen::header(&request, "webhook-signature"),
                            content_type: Seen::header(&request, "content-type"),
                            user_agent: Seen::header(&request, "user-agent"),
                            body: Vec::new(),
                        };
                        record.body =
                            request.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        let n = {
                            let mut seen = seen.lock().expect("not poisoned");
                            seen.push(record);
                            seen.len() - 1
                        };
                        Ok::<_, Infallible>(respond(n))
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Receiver { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn url(&self) -> Url {
        Url::parse(&format!("http://{}/hooks/retouch", self.addr)).expect("valid URL")
    }
}

/// A bare TCP listener that counts connections and keeps them open without ever answering.
struct Silent {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Silent { addr, accepts }
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// Settings for local receivers: http allowed, the given addresses listed, tiny delays.
fn settings(allowed: &[SocketAddr]) -> WebhookSettings {
    WebhookSettings {
        allow_hosts: allowed.iter().map(ToString::to_string).collect(),
        secret: SECRET.into(),
        timeout: Duration::from_secs(5),
        retry_for: Duration::from_secs(30),
        retry_backoff: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        allow_http: true,
        concurrency: 4,
    }
}

/// The Standard Webhooks signature computed here, without the crate's `Signer`.
fn expected_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = STANDARD.decode(SECRET.strip_prefix("whsec_").expect("prefixed")).expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

#[tokio::test]
async fn retries_until_delivered_with_valid_signatures() {
    let receiver =
        Receiver::start(|n| status(if n < 3 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::NO_CONTENT })).await;
    let client = WebhookClient::new(&settings(&[receiver.addr])).expect("client");

    let before = unix_now();
    let delivery = client.deliver(&receiver.url(), "msg_retouch_j-1", BODY, SystemTime::now()).await;
    let after = unix_now();

    assert_eq!(delivery.outcome, Outcome::Delivered, "{delivery:?}");
    assert_eq!(delivery.attempts, 4, "{delivery:?}");
    assert_eq!(delivery.last_status, Some(204));
    assert_eq!(delivery.last_error, None);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (n, request) in seen.iter().enumerate() {
        assert_eq!(request.id, "msg_retouch_j-1", "request {n}: the same id on every attempt");
        assert_eq!(request.body, BODY, "request {n}: the exact body");
        assert_eq!(request.content_type, "application/json");
        assert!(request.user_agent.starts_with("retouch-webhooks/"), "{}", request.user_agent);
        let timestamp: u64 = request.timestamp.parse().expect("unix seconds");
        assert!((before..=after).contains(&timestamp), "request {n}: timestamp {timestamp} not the send time");
        assert_eq!(
            request.signature,
            expected_signature(&request.id, &request.timestamp, &request.body),
            "request {n}: signature"
        );
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let target = Silent::start().await;
    let location = format!("http://{}/elsewhere", target.addr);
    let redirector = Receiver::start(move |_| {
        let mut response = status(StatusCode::FOUND);
        response.headers_mut().insert("location", location.parse().expect("header value"));
        response
    })
    .await;
    // Both listed: only the refusal to follow redirects keeps the second one untouched.
    let settings =
        WebhookSettings { retry_for: Duration::from_millis(300), ..settings(&[redirector.addr, target.addr]) };
    let client = WebhookClient::new(&settings).expect("client");

    let delivery = client.deliver(&redirector.url(), "msg_redirect", BODY, SystemTime::now()).await;

    assert_eq!(delivery.outcome, Outcome::GaveUp, "{delivery:?}");
    assert_eq!(delivery.last_status, Some(302));
    assert_eq!(delivery.last_error.as_deref(), Some("HTTP 302 Found"));
    assert!(delivery.attempts >= 2, "retried within the window: {delivery:?}");
    assert_eq!(redirector.seen().len(), delivery.attempts as usize);
    assert_eq!(target.accepts.load(Ordering::SeqCst), 0, "the redirect target was contacted");
}

#[tokio::test]
async fn hosts_not_on_the_list_are_never_contacted() {
    let listed = Silent::start().await;
    let unlisted = Silent::start().await;
    let client = WebhookClient::new(&settings(&[listed.addr])).expect("client");
    let url = Url::parse(&format!("http://{}/hook", unlisted.addr)).expect("valid URL");

    let delivery = client.deliver(&url, "msg_refused", BODY, SystemTime::now()).await;
    assert_eq!(delivery.outcome, Outcome::Refused, "{delivery:?}");
    assert_eq!((delivery.attempts, delivery.last_status), (0, None));
    let error = delivery.last_error.expect("a reason");
    assert!(error.contains(&unlisted.addr.to_string()) && error.contains("allow_hosts"), "{error}");
    let attempt = client.attempt(&url, "msg_refused", BODY).await;
    assert!(matches!(attempt, Attempt::Refused { .. }), "{attempt:?}");

    // Same port, named differently: names and addresses never match each other.
    let by_name = Url::parse(&format!("http://localhost:{}/hook", listed.addr.port())).expect("valid URL");
    assert_eq!(client.deliver(&by_name, "msg_refused", BODY, SystemTime::now()).await.outcome, Outcome::Refused);
    // http:// to a listed host while allow_http is off.
    let https_only =
        WebhookClient::new(&WebhookSettings { allow_http: false, ..settings(&[listed.addr]) }).expect("client");
    let plain = Url::parse(&format!("http://{}/hook", listed.addr)).expect("valid URL");
    assert_eq!(https_only.deliver(&plain, "msg_refused", BODY, SystemTime::now()).await.outcome, Outcome::Refused);
    // An id that cannot be a header value.
    let listed_url = Url::parse(&format!("http://{}/hook", listed.addr)).expect("valid URL");
    assert_eq!(
        client.deliver(&listed_url, "msg\nX-Injected: 1", BODY, SystemTime::now()).await.outcome,
        Outcome::Refused
    );

    assert_eq!(unlisted.accepts.load(Ordering::SeqCst), 0, "the unlisted host was contacted");
    assert_eq!(listed.accepts.load(Ordering::SeqCst), 0, "a refused request was sent");
}

#[tokio::test]
async fn an_attempt_ends_at_the_timeout() {
    let silent = Silent::start().await;
    let settings =
        WebhookSettings { timeout: Duration::from_millis(200), retry_for: Duration::ZERO, ..settings(&[silent.addr]) };
    let client = WebhookClient::new(&settings).expect("client");
    let url = Url::parse(&format!("http://{}/hook", silent.addr)).expect("valid URL");

    let started = Instant::now();
    let attempt = client.attempt(&url, "msg_timeout", BODY).await;
    let took = started.elapsed();
    assert!(matches!(&attempt, Attempt::Failed { error } if error.contains("no response within")), "{attempt:?}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "{took:?}");

    // retry_for 0: one attempt, then give up.
    let delivery = client.deliver(&url, "msg_timeout", BODY, SystemTime::now()).await;
    assert_eq!(delivery.outcome, Outcome::GaveUp, "{delivery:?}");
    assert_eq!((delivery.attempts, delivery.last_status), (1, None));
    assert!(delivery.last_error.as_deref().is_some_and(|e| e.contains("no response within")), "{delivery:?}");
    assert!(silent.accepts.load(Ordering::SeqCst) >= 1, "the attempts reached the receiver");
}

#[tokio::test]
async fn a_window_that_has_passed_still_gets_one_attempt() {
    let receiver = Receiver::start(|_| status(StatusCode::INTERNAL_SERVER_ERROR)).await;
    let settings = WebhookSettings { retry_for: Duration::from_secs(60), ..settings(&[receiver.addr]) };
    let client = WebhookClient::new(&settings).expect("client");
    let long_ago = SystemTime::now() - Duration::from_secs(3600);

    let delivery = client.deliver(&receiver.url(), "msg_late", BODY, long_ago).await;

    assert_eq!(delivery.outcome, Outcome::GaveUp, "{delivery:?}");
    assert_eq!((delivery.attempts, delivery.last_status), (1, Some(500)));
    assert_eq!(delivery.last_error.as_deref(), Some("HTTP 500 Internal Server Error"));
}

#[tokio::test]
async fn a_client_needs_a_secret_and_valid_settings() {
    assert!(matches!(WebhookClient::new(&WebhookSettings::default()), Err(retouch_webhooks::WebhookError::Disabled)));
    let bad = WebhookSettings { secret: SECRET.into(), concurrency: 0, ..Default::default() };
    let e = WebhookClient::new(&bad).expect_err("invalid");
    assert!(e.to_string().contains("concurrency"), "{e}");
    let client = WebhookClient::new(&WebhookSettings { secret: SECRET.into(), ..Default::default() }).expect("client");
    assert!(!format!("{client:?}").contains("MfKQ"), "Debug shows no key");
}
