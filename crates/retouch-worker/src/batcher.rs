//! Groups prepared jobs into model calls.
//!
//! Jobs are compatible when they share the processed size, the step count, the scheduler and
//! its Karras-sigma setting (one UNet call per step must serve them all, at one timestep).
//! Everything else — instruction, negative prompt, seed, guidance — is per image. A group is
//! ready when it holds `max_batch` jobs, its oldest job has waited `max_batch_wait`, or it
//! holds an urgent (high-priority) job. The batcher owns the groups and hands one over only
//! when the dispatcher asks for it, i.e. when the model is free: the batch is chosen at that
//! moment — urgent groups first, then the oldest — so a high-priority job that arrived while
//! the model worked is the next to run, and a busy model gets fuller batches.

use std::time::Duration;

use retouch_core::params::SchedulerKind;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What must be equal for two jobs to share a model call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Processed width and height.
    pub size: (u32, u32),
    /// Denoising steps.
    pub steps: u32,
    /// Sampler (already resolved to the checkpoint's default when the job named none).
    pub scheduler: SchedulerKind,
    /// `karras_sigmas` as the job gave it (`None`: the checkpoint's scheduler config decides).
    pub karras_sigmas: Option<bool>,
}

/// Something the batcher can group.
pub trait Batchable: Send + 'static {
    /// Its compatibility key.
    fn key(&self) -> BatchKey;
    /// Whether it should run as soon as the model is free (a high-priority job).
    fn urgent(&self) -> bool {
        false
    }
}

/// Jobs that can share a model call, collected since `since`.
struct Group<T> {
    /// What they share.
    key: BatchKey,
    /// When the first arrived.
    since: Instant,
    /// Whether one of them is urgent.
    urgent: bool,
    /// The jobs.
    items: Vec<T>,
}

/// The batcher's rules.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// Most items per batch.
    pub max_batch: usize,
    /// Longest wait for companions.
    pub max_wait: Duration,
}

/// How the dispatcher asks for the next batch: it sends a reply slot, the batcher answers with
/// a batch as soon as one is ready.
pub type BatchRequest<T> = oneshot::Sender<Vec<T>>;

/// Runs until `input` closes (then flushes every group) or `stop` fires (then returns the
/// undispatched items through `leftovers` for release). Each request on `requests` is answered
/// with one batch.
pub async fn run<T: Batchable>(
    policy: BatchPolicy,
    mut input: mpsc::Receiver<T>,
    mut requests: mpsc::Receiver<BatchRequest<T>>,
    stop: CancellationToken,
    leftovers: impl Fn(T) + Send,
) {
    let mut groups: Vec<Group<T>> = Vec::new();
    let mut input_open = true;
    loop {
        if !input_open && groups.is_empty() {
            return;
        }
        let now = Instant::now();
        let is_ready = |g: &Group<T>| {
            g.urgent || g.items.len() >= policy.max_batch || now >= g.since + policy.max_wait || !input_open
        };
        // Groups are kept in arrival order of their first job: the first urgent ready group,
        // else the oldest ready one.
        let ready = groups.iter().position(|g| g.urgent && is_ready(g)).or_else(|| groups.iter().position(is_ready));
        let next_deadline = groups.iter().map(|g| g.since + policy.max_wait).min();
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            request = requests.recv(), if ready.is_some() => {
                let Some(reply) = request else { break };
                let group = groups.remove(ready.expect("guarded by the select condition"));
                if let Err(items) = reply.send(group.items) {
                    // The dispatcher is gone: nothing of this batch started.
                    items.into_iter().for_each(&leftovers);
                }
            }
            item = input.recv(), if input_open => match item {
                Some(item) => {
                    let (key, urgent) = (item.key(), item.urgent());
                    match groups.iter_mut().find(|g| g.key == key && g.items.len() < policy.max_batch) {
                        Some(group) => {
                            group.urgent |= urgent;
                            group.items.push(item);
                        }
                        None => groups.push(Group { key, since: Instant::now(), urgent, items: vec![item] }),
                    }
                }
                None => input_open = false,
            },
            () = sleep_until_opt(next_deadline), if ready.is_none() && next_deadline.is_some() => {}
        }
    }
    // Stopped: nothing queued here has started.
    for group in groups {
        group.items.into_iter().for_each(&leftovers);
    }
    input.close();
    while let Some(item) = input.recv().await {
        leftovers(item);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item(u32, u32);

    impl Batchable for Item {
        fn key(&self) -> BatchKey {
            BatchKey {
                size: (self.0, self.0),
                steps: 10,
                scheduler: SchedulerKind::EulerAncestral,
                karras_sigmas: (100..1000).contains(&self.1).then_some(true),
            }
        }
        fn urgent(&self) -> bool {
            self.1 >= 1000
        }
    }

    fn policy(max_batch: usize, ms: u64) -> BatchPolicy {
        BatchPolicy { max_batch, max_wait: Duration::from_millis(ms) }
    }

    /// The dispatcher's side: asks for one batch.
    async fn next(requests: &mpsc::Sender<BatchRequest<Item>>) -> Option<Vec<Item>> {
        let (tx, rx) = oneshot::channel();
        requests.send(tx).await.ok()?;
        rx.await.ok()
    }

    #[tokio::test(start_paused = true)]
    async fn full_groups_leave_at_once_and_partial_ones_after_the_wait() {
        let (tx, rx) = mpsc::channel(16);
        let (req_tx, req_rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(policy(2, 100), rx, req_rx, stop.clone(), |_| {}));
        tx.send(Item(64, 1)).await.expect("send");
        tx.send(Item(64, 2)).await.expect("send");
        tx.send(Item(32, 3)).await.expect("send");
        assert_eq!(next(&req_tx).await.expect("batch"), vec![Item(64, 1), Item(64, 2)]);
        let before = Instant::now();
        assert_eq!(next(&req_tx).await.expect("batch"), vec![Item(32, 3)]);
        assert!(Instant::now() - before >= Duration::from_millis(99), "the partial group waited");
        drop(tx);
        task.await.expect("batcher ends when the input closes");
        assert_eq!(next(&req_tx).await, None, "no batch after the end");
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_job_goes_first_without_waiting() {
        let (tx, rx) = mpsc::channel(16);
        let (req_tx, req_rx) = mpsc::channel(1);
        let task = tokio::spawn(run(policy(4, 10_000), rx, req_rx, CancellationToken::new(), |_| {}));
        for item in [Item(64, 1), Item(64, 2), Item(32, 3), Item(16, 1000)] {
            tx.send(item).await.expect("send");
        }
        tokio::task::yield_now().await;
        let started = Instant::now();
        // The oldest group is not ready (not full, not aged): the urgent one leaves at once.
        assert_eq!(next(&req_tx).await.expect("batch"), vec![Item(16, 1000)]);
        assert!(Instant::now() - started < Duration::from_millis(1));
        // An urgent job joining a compatible group makes that group leave first.
        tx.send(Item(32, 1001)).await.expect("send");
        tokio::task::yield_now().await;
        assert_eq!(next(&req_tx).await.expect("batch"), vec![Item(32, 3), Item(32, 1001)]);
        drop(tx);
        assert_eq!(next(&req_tx).await.expect("flush"), vec![Item(64, 1), Item(64, 2)]);
        task.await.expect("ends");
    }

    #[tokio::test(start_paused = true)]
    async fn karras_sigmas_split_otherwise_equal_jobs() {
        let (tx, rx) = mpsc::channel(16);
        let (req_tx, req_rx) = mpsc::channel(1);
        let task = tokio::spawn(run(policy(4, 100), rx, req_rx, CancellationToken::new(), |_| {}));
        for item in [Item(64, 1), Item(64, 100), Item(64, 2), Item(64, 101)] {
            tx.send(item).await.expect("send");
        }
        drop(tx);
        let mut batches = vec![next(&req_tx).await.expect("batch"), next(&req_tx).await.expect("batch")];
        batches.sort_by_key(|b| b[0].1);
        assert_eq!(batches, vec![vec![Item(64, 1), Item(64, 2)], vec![Item(64, 100), Item(64, 101)]]);
        task.await.expect("ends");
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_input_flushes_without_waiting() {
        let (tx, rx) = mpsc::channel(16);
        let (req_tx, req_rx) = mpsc::channel(1);
        let task = tokio::spawn(run(policy(4, 10_000), rx, req_rx, CancellationToken::new(), |_| {}));
        tx.send(Item(8, 1)).await.expect("send");
        drop(tx);
        let started = Instant::now();
        assert_eq!(next(&req_tx).await.expect("batch"), vec![Item(8, 1)]);
        assert!(Instant::now() - started < Duration::from_millis(1));
        task.await.expect("ends");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_returns_undispatched_items() {
        let (tx, rx) = mpsc::channel(16);
        let (_req_tx, req_rx) = mpsc::channel::<BatchRequest<Item>>(1);
        let stop = CancellationToken::new();
        let released = Arc::new(Mutex::new(Vec::new()));
        let sink = released.clone();
        let task = tokio::spawn(run(policy(4, 10_000), rx, req_rx, stop.clone(), move |i: Item| {
            sink.lock().expect("lock").push(i.1)
        }));
        tx.send(Item(8, 1)).await.expect("send");
        tx.send(Item(16, 2)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
        stop.cancel();
        task.await.expect("ends");
        let mut got = released.lock().expect("lock").clone();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
    }
}
