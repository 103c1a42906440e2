//! The webhook relay of `retouch worker`: consumes the durable webhook queue and POSTs each
//! result to its job's URL, signed (Standard Webhooks), retried with backoff for
//! `webhooks.retry_for`; acks once delivered, dead-letters with the last HTTP status when it
//! gives up or the URL is not allowed (then nothing is contacted). At most
//! `webhooks.concurrency` deliveries run at once. On shutdown, deliveries in progress go back
//! to the queue for another relay.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use retouch_amqp::{WebhookMessage, WebhookQueue};
use retouch_webhooks::{AllowList, Outcome, WebhookClient, WebhookSettings};
use retouch_worker::metrics::Metrics;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs the relay until `stop` fires; then releases the deliveries in progress and returns.
pub async fn run(
    mut queue: WebhookQueue,
    settings: WebhookSettings,
    client: Arc<WebhookClient>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let allow = Arc::new(settings.allow_list());
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let message = tokio::select! {
            () = stop.cancelled() => break,
            m = queue.next() => match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "the webhook relay stops");
                    break;
                }
            },
        };
        let (client, metrics, stop, allow) = (client.clone(), metrics.clone(), stop.clone(), allow.clone());
        let allow_http = settings.allow_http;
        tasks.spawn(async move {
            let _permit = permit;
            deliver(message, &client, &allow, allow_http, &metrics, &stop).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// One delivery, settled.
async fn deliver(
    message: WebhookMessage,
    client: &WebhookClient,
    allow: &AllowList,
    allow_http: bool,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let (id, published_at) = (message.id(), message.published_at());
    let since = || SystemTime::now().duration_since(published_at).unwrap_or(Duration::ZERO).as_secs_f64();
    let url = match message
        .url()
        .ok_or_else(|| "no URL header".to_string())
        .and_then(|u| allow.check(&u, allow_http).map_err(|e| e.to_string()))
    {
        Ok(url) => url,
        Err(why) => {
            tracing::warn!(id, reason = %why, "webhook refused; dead-lettering it (nothing was contacted)");
            metrics.webhook("refused", since());
            if let Err(e) = message.dead_letter(None, &format!("refused: {why}")).await {
                tracing::error!(id, error = %e, "could not dead-letter a refused webhook");
            }
            return;
        }
    };
    let delivery = tokio::select! {
        d = client.deliver(&url, &id, message.body(), published_at) => d,
        () = stop.cancelled() => {
            if let Err(e) = message.release().await {
                tracing::warn!(id, error = %e, "could not give a webhook delivery back; the broker will");
            }
            return;
        }
    };
    match delivery.outcome {
        Outcome::Delivered => {
            metrics.webhook("delivered", since());
            tracing::info!(id, host = url.host_str().unwrap_or(""), attempts = delivery.attempts, "webhook delivered");
            if let Err(e) = message.ack().await {
                tracing::warn!(id, error = %e, "webhook ack lost; it will be delivered again (same webhook-id)");
            }
        }
        Outcome::GaveUp | Outcome::Refused => {
            let label = if delivery.outcome == Outcome::Refused { "refused" } else { "gave_up" };
            metrics.webhook(label, since());
            let reason = delivery.last_error.unwrap_or_else(|| "not delivered".into());
            tracing::error!(id, host = url.host_str().unwrap_or(""), status = ?delivery.last_status, %reason,
                attempts = delivery.attempts, "webhook given up; dead-lettering it");
            if let Err(e) = message.dead_letter(delivery.last_status, &reason).await {
                tracing::error!(id, error = %e, "could not dead-letter a webhook delivery; it will be retried");
            }
        }
    }
}
