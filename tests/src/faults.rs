//! [`FaultProxy`]: S3 faults on the wire. A TCP proxy between a worker and an [`S3Server`] that
//! understands just enough HTTP/1.1 (request and status lines, headers, `Content-Length` and
//! `chunked` bodies, keep-alive connections carrying many requests, `1xx` interim answers) to
//! apply a scripted plan of [`Fault`]s to the requests that match a [`Rule`] (method + a
//! substring of the path), and records every request it saw ([`Exchange`]) so that a test can
//! assert that retries happened.
//!
//! Requests are forwarded byte for byte (the `Host` header the client signed stays as it is, so
//! SigV4 still checks out at the server), each on a fresh connection to the server. Whole
//! messages are buffered: fine for the test images, not a general-purpose proxy. The proxy runs
//! on a private tokio runtime; dropping it stops it.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::S3Server;

/// What the proxy does to a request matched by a [`Rule`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers by itself with this HTTP status and an S3 XML error body with this code
    /// (`Status(503, "SlowDown")`, `Status(500, "InternalError")`); the request never reaches
    /// the server. The request body is read first, so the connection stays usable.
    Status(u16, &'static str),
    /// Waits this long, then forwards the request as usual (a latency spike before the server).
    Delay(Duration),
    /// Cuts the body in flight at half its length and resets (RST) the connection. For a
    /// request with a body (PUT) that body is cut: the server gets the headers and half the
    /// body, then both connections are reset and the client gets no answer. Otherwise (GET) the
    /// response is cut: the client gets the server's headers (the correct `Content-Length`) and
    /// half the body, then a reset.
    ResetMidBody,
    /// As [`ResetMidBody`](Self::ResetMidBody), but the connections are closed cleanly (FIN):
    /// the receiver sees a correct `Content-Length` and fewer bytes, then the end of the stream.
    TruncateBody,
}

/// Which requests a [`Fault`] applies to, and how many times.
#[derive(Clone, Debug)]
pub struct Rule {
    /// HTTP method (`GET`, `PUT`, `HEAD`), compared exactly.
    pub method: String,
    /// A substring of the request target (path and query), e.g. `inputs/a.png`.
    pub key: String,
    /// What is done to a matching request.
    pub fault: Fault,
    /// How many more matching requests get the fault (`None`: all of them).
    pub remaining: Option<u32>,
}

impl Rule {
    /// `fault` on the first `n` requests that match `method` and `key`; later ones pass through.
    pub fn first(n: u32, method: &str, key: &str, fault: Fault) -> Self {
        Self { method: method.to_string(), key: key.to_string(), fault, remaining: Some(n) }
    }

    /// `fault` on every request that matches `method` and `key`, for as long as the proxy runs.
    pub fn always(method: &str, key: &str, fault: Fault) -> Self {
        Self { method: method.to_string(), key: key.to_string(), fault, remaining: None }
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.remaining != Some(0) && self.method == method && target.contains(&self.key)
    }
}

/// One request the proxy received, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Which client connection carried it (numbered from 0 in accept order): a keep-alive
    /// connection carries several requests.
    pub connection: usize,
    /// HTTP method.
    pub method: String,
    /// Request target as sent (path and query).
    pub target: String,
    /// The fault applied, if a rule matched (`None`: forwarded untouched).
    pub fault: Option<Fault>,
    /// Length of the request body as received from the client (`chunked` framing included).
    pub request_body: usize,
    /// Whether the request body was `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Status line sent back to the client (the server's, or the injected one); `None` while
    /// waiting, and when no answer was sent (a cut request, a client gone during a delay).
    pub status: Option<u16>,
    /// `Content-Length` of that answer, if it had one (a HEAD's is the object's size).
    pub content_length: Option<u64>,
}

/// Plan and log, shared by the connections.
#[derive(Default)]
struct Shared {
    /// The scripted faults, first match wins.
    rules: Vec<Rule>,
    /// Every request, in arrival order.
    seen: Vec<Exchange>,
}

type State = Arc<Mutex<Shared>>;

fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fault-injecting HTTP/1.1 proxy in front of an [`S3Server`] (see the module doc).
pub struct FaultProxy {
    /// Where it listens.
    addr: SocketAddr,
    /// Plan and log.
    state: State,
    /// Runs the accept loop and the connections; shut down on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `s3`'s port, with an empty plan.
    pub fn start(s3: &S3Server) -> Self {
        Self::start_to(([127, 0, 0, 1], s3.port).into())
    }

    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream`, with an empty plan.
    pub fn start_to(upstream: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("fault proxy runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let state = State::default();
        let accept_state = state.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let mut connection = 0;
            while let Ok((client, _)) = listener.accept().await {
                let state = accept_state.clone();
                tokio::spawn(async move {
                    // A connection ends with an error whenever a fault cuts it, or the client
                    // gives up: nothing to report, the log says what happened.
                    let _ = serve(connection, client, upstream, state).await;
                });
                connection += 1;
            }
        });
        Self { addr, state, runtime: Some(runtime) }
    }

    /// The endpoint to give the client: `http://127.0.0.1:<proxy port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule at the end of the plan (an earlier matching rule wins).
    pub fn add(&self, rule: Rule) {
        lock(&self.state).rules.push(rule);
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Exchange> {
        lock(&self.state).seen.clone()
    }

    /// The requests seen so far with `method` whose target contains `key`, in arrival order.
    pub fn seen_for(&self, method: &str, key: &str) -> Vec<Exchange> {
        self.seen().into_iter().filter(|e| e.method == method && e.target.contains(key)).collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Longest header section accepted.
const MAX_HEAD: usize = 64 * 1024;

/// The parts of a message head the proxy needs.
struct Head {
    /// The raw bytes, up to and including the empty line.
    raw: Vec<u8>,
    /// First line, split on spaces: method/target/version or version/status/reason.
    start: Vec<String>,
    /// `Content-Length`.
    content_length: Option<u64>,
    /// `Transfer-Encoding: chunked`.
    chunked: bool,
    /// `Connection: close`.
    close: bool,
}

/// How a body is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads one message head; `None` on a clean end of stream before it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        if r.read_until(b'\n', &mut raw).await? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream inside a message head"))
            };
        }
        if raw.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message head too long"));
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            // Tolerates empty lines before a message (RFC 9112 §2.2).
            if before == 0 {
                raw.clear();
                continue;
            }
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let start = lines.next().unwrap_or_default().splitn(3, ' ').map(str::to_string).collect();
    let (mut content_length, mut chunked, mut close) = (None, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().ok(),
            "transfer-encoding" => chunked = value.split(',').any(|v| v.trim() == "chunked"),
            "connection" => close = value.split(',').any(|v| v.trim() == "close"),
            _ => {}
        }
    }
    Ok(Some(Head { raw, start, content_length, chunked, close }))
}

/// Reads a body as it is on the wire (a `chunked` body keeps its framing and trailers).
async fn read_body<R: AsyncRead + Unpin>(r: &mut BufReader<R>, framing: Framing) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            body.resize(usize::try_from(n).map_err(|_| io::Error::other("body too large"))?, 0);
            r.read_exact(&mut body).await?;
        }
        Framing::UntilClose => {
            r.read_to_end(&mut body).await?;
        }
        Framing::Chunked => loop {
            let start = body.len();
            if r.read_until(b'\n', &mut body).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream inside a chunked body"));
            }
            let line = String::from_utf8_lossy(&body[start..]).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let start = body.len();
                    if r.read_until(b'\n', &mut body).await? == 0 || matches!(&body[start..], b"\r\n" | b"\n") {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            r.read_exact(&mut body[start..]).await?;
        },
    }
    Ok(body)
}

fn request_framing(head: &Head) -> Framing {
    match (head.chunked, head.content_length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    }
}

fn response_framing(head: &Head, method: &str, status: u16) -> Framing {
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else if head.chunked {
        Framing::Chunked
    } else if let Some(n) = head.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    }
}

/// How long a cut connection stays open after the partial body, so that the receiver has
/// taken the headers and the bytes sent before the reset arrives (a reset discards what is
/// still in the sender's buffer).
const BEFORE_CUT: Duration = Duration::from_millis(200);

/// Closes a connection: RST (`reset`) or FIN.
async fn close(stream: &mut TcpStream, reset: bool) {
    if reset {
        tokio::time::sleep(BEFORE_CUT).await;
        let _ = stream.set_zero_linger();
    } else {
        let _ = stream.shutdown().await;
    }
}

/// The S3-style error answer of a [`Fault::Status`] (headers only for a HEAD), and the length
/// of its body.
fn error_answer(status: u16, code: &str, target: &str, id: usize, head_only: bool) -> (Vec<u8>, usize) {
    let reason = match status {
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Injected Fault",
    };
    let resource = target.split('?').next().unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test's \
         fault proxy</Message><Resource>{resource}</Resource><RequestId>fault-{id}</RequestId></Error>"
    );
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         x-amz-request-id: fault-{id}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        answer.extend_from_slice(body.as_bytes());
    }
    (answer, body.len())
}

/// Serves one client connection: request after request, each forwarded on a fresh connection
/// to `upstream` unless its fault says otherwise.
async fn serve(connection: usize, client: TcpStream, upstream: SocketAddr, state: State) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let mut client = BufReader::new(client);
    loop {
        let Some(request) = read_head(&mut client).await? else { return Ok(()) };
        let method = request.start.first().cloned().unwrap_or_default();
        let target = request.start.get(1).cloned().unwrap_or_default();
        let body = read_body(&mut client, request_framing(&request)).await?;
        let (index, fault) = {
            let mut shared = lock(&state);
            let fault = shared.rules.iter_mut().find(|r| r.matches(&method, &target)).map(|rule| {
                if let Some(n) = rule.remaining.as_mut() {
                    *n -= 1;
                }
                rule.fault.clone()
            });
            shared.seen.push(Exchange {
                connection,
                method: method.clone(),
                target: target.clone(),
                fault: fault.clone(),
                request_body: body.len(),
                chunked: request.chunked,
                status: None,
                content_length: None,
            });
            (shared.seen.len() - 1, fault)
        };
        let answered = |status: u16, content_length: Option<u64>| {
            let mut shared = lock(&state);
            shared.seen[index].status = Some(status);
            shared.seen[index].content_length = content_length;
        };
        let cut = match fault {
            Some(Fault::Status(status, code)) => {
                let (answer, length) = error_answer(status, code, &target, index, method == "HEAD");
                // Recorded before the client can see the answer, so the log never lags it.
                answered(status, Some(length as u64));
                client.write_all(&answer).await?;
                client.flush().await?;
                if request.close {
                    return Ok(());
                }
                continue;
            }
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                None
            }
            Some(Fault::ResetMidBody) => Some(true),
            Some(Fault::TruncateBody) => Some(false),
            None => None,
        };

        let mut server = BufReader::new(TcpStream::connect(upstream).await?);
        let _ = server.get_ref().set_nodelay(true);
        server.write_all(&request.raw).await?;
        if let Some(reset) = cut
            && !body.is_empty()
        {
            // The request body is cut: the server gets half of it, nobody gets an answer.
            server.write_all(&body[..body.len() / 2]).await?;
            server.flush().await?;
            close(server.get_mut(), reset).await;
            close(client.get_mut(), reset).await;
            return Ok(());
        }
        server.write_all(&body).await?;
        server.flush().await?;

        // Interim (1xx) answers are passed on; then the final one.
        let (response, status) = loop {
            let response = read_head(&mut server)
                .await?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed without an answer"))?;
            let status: u16 = response.start.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                client.write_all(&response.raw).await?;
                continue;
            }
            break (response, status);
        };
        let response_body = read_body(&mut server, response_framing(&response, &method, status)).await?;
        // Recorded before the client can see the answer, so the log never lags it.
        answered(status, response.content_length);
        client.write_all(&response.raw).await?;
        if let Some(reset) = cut {
            // The response body is cut: correct headers, half the bytes.
            client.write_all(&response_body[..response_body.len() / 2]).await?;
            client.flush().await?;
            close(client.get_mut(), reset).await;
            return Ok(());
        }
        client.write_all(&response_body).await?;
        client.flush().await?;
        if request.close
            || response.close
            || matches!(response_framing(&response, &method, status), Framing::UntilClose)
        {
            close(client.get_mut(), false).await;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    use super::*;

    /// Reads one request (head + `Content-Length` or `chunked` body) as raw bytes.
    fn read_request(r: &mut impl BufRead) -> Option<Vec<u8>> {
        let mut raw = Vec::new();
        let (mut length, mut chunked) = (0, false);
        loop {
            let start = raw.len();
            if r.read_until(b'\n', &mut raw).ok()? == 0 {
                return None;
            }
            let line = String::from_utf8_lossy(&raw[start..]).to_ascii_lowercase();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse().ok()?;
            }
            chunked |= line.starts_with("transfer-encoding:") && line.contains("chunked");
        }
        if chunked {
            while !raw.ends_with(b"\r\n0\r\n\r\n") {
                r.read_until(b'\n', &mut raw).ok()?;
            }
        } else {
            let start = raw.len();
            raw.resize(start + length, 0);
            r.read_exact(&mut raw[start..]).ok()?;
        }
        Some(raw)
    }

    /// A server that answers each request with 200 and the request's own bytes as the body.
    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut stream = stream;
                    while let Some(request) = read_request(&mut reader) {
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", request.len());
                        let _ = stream.write_all(&[head.as_bytes(), &request].concat());
                    }
                });
            }
        });
        addr
    }

    /// Reads one response: `(status, Content-Length, body)`; the body is what arrived before
    /// the end of the announced length or of the stream.
    fn read_response(r: &mut impl BufRead) -> (u16, usize, Vec<u8>) {
        let mut status = 0;
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("response head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if line.starts_with("HTTP/1.1 ") {
                status = line[9..12].parse().expect("status");
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().expect("length");
            }
        }
        let mut body = Vec::new();
        let _ = r.take(length as u64).read_to_end(&mut body);
        (status, length, body)
    }

    #[test]
    fn forwards_byte_for_byte_on_keep_alive_connections_and_injects_statuses() {
        let proxy = FaultProxy::start_to(echo_server());
        proxy.add(Rule::first(1, "GET", "/bucket/flaky", Fault::Status(503, "SlowDown")));
        let client = TcpStream::connect(proxy.addr).expect("connect");
        let mut reader = BufReader::new(client.try_clone().expect("clone"));
        let mut client = client;
        let put = b"PUT /bucket/key HTTP/1.1\r\nHost: 127.0.0.1:1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        client.write_all(put).expect("put");
        let (status, _, body) = read_response(&mut reader);
        assert_eq!((status, body.as_slice()), (200, put.as_slice()), "the server got the request as sent");
        let get = b"GET /bucket/flaky?x-id=GetObject HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n";
        client.write_all(get).expect("get");
        let (status, _, body) = read_response(&mut reader);
        assert_eq!(status, 503);
        assert!(String::from_utf8_lossy(&body).contains("<Code>SlowDown</Code>"));
        client.write_all(get).expect("get again");
        let (status, _, body) = read_response(&mut reader);
        assert_eq!((status, body.as_slice()), (200, get.as_slice()), "the plan is spent: passed through");

        let seen = proxy.seen();
        let summary: Vec<_> =
            seen.iter().map(|e| (e.connection, e.method.as_str(), e.fault.clone(), e.status)).collect();
        assert_eq!(
            summary,
            [
                (0, "PUT", None, Some(200)),
                (0, "GET", Some(Fault::Status(503, "SlowDown")), Some(503)),
                (0, "GET", None, Some(200))
            ]
        );
        assert!(seen[0].chunked && seen[0].request_body == 15, "{:?}", seen[0]);
    }

    #[test]
    fn truncates_a_response_under_its_content_length() {
        let proxy = FaultProxy::start_to(echo_server());
        proxy.add(Rule::first(1, "GET", "/bucket/key", Fault::TruncateBody));
        let mut client = TcpStream::connect(proxy.addr).expect("connect");
        client.write_all(b"GET /bucket/key HTTP/1.1\r\nHost: h\r\n\r\n").expect("get");
        let (status, length, body) = read_response(&mut BufReader::new(client));
        assert_eq!((status, body.len()), (200, length / 2), "headers intact, half the body, then the end");
    }
}
