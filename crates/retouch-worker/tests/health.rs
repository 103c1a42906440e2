//! `/readyz` follows the model's health after it loaded: a batch that fails in the model makes
//! the worker unready (with the reason), the next successful batch makes it ready again, and so
//! does the passing of the hold on a worker left idle; an invalid batch is the job's fault and
//! changes nothing. `retouch_model_ready` keeps meaning "loaded" throughout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::RgbImage;
use retouch_core::editor::{
    EditBatch, EditError, EditErrorKind, EditObserver, EditRequest, EditedImage, Editor, ModelInfo,
};
use retouch_core::queue::QueueCounters;
use retouch_worker::backend::{Backend, ModelState};
use retouch_worker::http::{self, HttpState};
use retouch_worker::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers each batch with the next scripted outcome (`None` = success).
struct Scripted {
    info: ModelInfo,
    outcomes: Mutex<VecDeque<Option<EditErrorKind>>>,
}

impl Editor for Scripted {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn edit(&self, batch: &EditBatch, _observer: &mut dyn EditObserver) -> Result<Vec<EditedImage>, EditError> {
        match self.outcomes.lock().expect("lock").pop_front().flatten() {
            Some(kind) => Err(EditError { kind, message: format!("scripted {kind:?}") }),
            None => Ok(batch
                .requests
                .iter()
                .map(|r| EditedImage {
                    image: r.image.clone(),
                    instruction_truncated: false,
                    nsfw_content_detected: None,
                })
                .collect()),
        }
    }
}

fn batch() -> EditBatch {
    EditBatch {
        steps: 1,
        scheduler: None,
        karras_sigmas: None,
        requests: vec![EditRequest {
            image: RgbImage::new(8, 8),
            instruction: "x".into(),
            negative_prompt: None,
            seed: 0,
            guidance_scale: 7.5,
            image_guidance_scale: 1.5,
            init_latents: None,
        }],
    }
}

/// `GET path` on `addr`: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_models_health() {
    let info = ModelInfo {
        name: "scripted".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        size_multiple: 8,
        default_scheduler: None,
    };
    let outcomes = VecDeque::from([
        Some(EditErrorKind::Model),
        Some(EditErrorKind::InvalidInput),
        None,
        Some(EditErrorKind::Model),
    ]);
    let editor = Scripted { info: info.clone(), outcomes: Mutex::new(outcomes) };
    let counters = Arc::new(QueueCounters::default());
    counters.connected.store(true, Ordering::Relaxed);
    let metrics = Arc::new(Metrics::new(counters.clone()));
    let backend = Backend::spawn(move || Ok(Box::new(editor) as Box<dyn Editor>), metrics.clone(), "test");
    backend.ready().await.expect("loads");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = Duration::from_secs(2);
    let state = HttpState { metrics: metrics.clone(), model: backend.watch(), queue: counters, unhealthy_hold: hold };
    let server = tokio::spawn(http::serve(listener, state, std::future::pending()));
    let ready_gauge = || metrics.render().lines().any(|l| l == "retouch_model_ready 1");

    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    assert!(ready_gauge());

    let no_cancel = || Arc::new(AtomicBool::new(false));
    let failed = backend
        .edit(batch(), Duration::from_secs(5), no_cancel(), Default::default())
        .await
        .expect_err("scripted failure");
    assert_eq!(failed.kind, EditErrorKind::Model);
    assert!(matches!(backend.state(), ModelState::Unhealthy { .. }), "{:?}", backend.state());
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("model unhealthy") && body.contains("scripted Model"), "{body}");
    assert!(ready_gauge(), "retouch_model_ready still says loaded");

    // A batch the model refuses as invalid is not a sign of a sick model, but it is no success
    // either: the worker stays as it was until a batch succeeds.
    let invalid = backend
        .edit(batch(), Duration::from_secs(5), no_cancel(), Default::default())
        .await
        .expect_err("scripted invalid");
    assert_eq!(invalid.kind, EditErrorKind::InvalidInput);
    assert_eq!(get(addr, "/readyz").await.0, 503, "an invalid batch is the job's fault, not evidence of health");

    backend.edit(batch(), Duration::from_secs(5), no_cancel(), Default::default()).await.expect("scripted success");
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    assert!(ready_gauge());

    // Left idle after a failure, the worker is ready again once the hold has passed.
    // Taken before the call: the hold starts when the model fails, inside it.
    let failed_at = std::time::Instant::now();
    backend.edit(batch(), Duration::from_secs(5), no_cancel(), Default::default()).await.expect_err("scripted failure");
    assert_eq!(get(addr, "/readyz").await.0, 503);
    let deadline = failed_at + Duration::from_secs(30);
    loop {
        let (status, _) = get(addr, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status} long after the hold");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed_at.elapsed() >= hold, "ready again only after the hold");
    server.abort();
}
