//! [`CancelRegistry`]: the cancel requests this worker knows of, asked at every stage of a
//! job's life (on arrival, before its model call, between denoising steps, before its upload).
//!
//! Filled by the cancel feed (the broker's cancel stream, read from its start when the worker
//! starts, then live) and forgotten after the retention the stream keeps them for. One owner:
//! the registry itself, behind a `std::sync::Mutex` held only for a lookup or an insert (never
//! across an await), because the model thread asks it between steps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use retouch_core::events::CancelRequest;

/// What has been cancelled, and when each request was made.
#[derive(Debug)]
pub struct CancelRegistry {
    /// How long a request stays in force.
    retention: Duration,
    /// The requests in force.
    state: Mutex<State>,
}

/// The registry's contents.
#[derive(Debug, Default)]
struct State {
    /// Cancelled job ids → when.
    jobs: HashMap<String, SystemTime>,
    /// Cancelled campaigns → when.
    campaigns: HashMap<String, SystemTime>,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        Self::new(Duration::from_secs(24 * 3600))
    }
}

impl CancelRegistry {
    /// An empty registry whose entries last `retention`.
    pub fn new(retention: Duration) -> Self {
        Self { retention, state: Mutex::new(State::default()) }
    }

    /// Records `request`, made at `at`; drops entries older than the retention.
    pub fn record(&self, request: &CancelRequest, at: SystemTime) {
        let mut state = self.lock();
        for id in &request.job_ids {
            state.jobs.insert(id.clone(), at);
        }
        if let Some(c) = &request.campaign_id {
            state.campaigns.insert(c.clone(), at);
        }
        let retention = self.retention;
        let fresh = |when: &mut SystemTime| when.elapsed().map_or(true, |age| age <= retention);
        state.jobs.retain(|_, when| fresh(when));
        state.campaigns.retain(|_, when| fresh(when));
    }

    /// Whether the job, or its campaign, is cancelled.
    pub fn is_cancelled(&self, job_id: &str, campaign_id: Option<&str>) -> bool {
        let state = self.lock();
        state.jobs.contains_key(job_id) || campaign_id.is_some_and(|c| state.campaigns.contains_key(c))
    }

    /// Requests in force (job ids + campaigns), for the logs.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.jobs.len() + state.campaigns.len()
    }

    /// Whether nothing is cancelled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a harmful way.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_campaigns_are_cancelled_until_the_retention_passes() {
        let r = CancelRegistry::new(Duration::from_secs(60));
        let now = SystemTime::now();
        r.record(&CancelRequest { job_ids: vec!["a".into()], ..CancelRequest::default() }, now);
        r.record(&CancelRequest { campaign_id: Some("spring".into()), ..CancelRequest::default() }, now);
        assert!(r.is_cancelled("a", None));
        assert!(r.is_cancelled("b", Some("spring")));
        assert!(!r.is_cancelled("b", Some("autumn")));
        assert!(!r.is_cancelled("b", None));
        // An old request is forgotten at the next record.
        r.record(
            &CancelRequest { job_ids: vec!["old".into()], ..CancelRequest::default() },
            now - Duration::from_secs(120),
        );
        assert!(!r.is_cancelled("old", None));
        assert_eq!(r.len(), 2);
    }
}
