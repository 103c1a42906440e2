//! The protocol's two small messages besides jobs and results: the progress events a job can
//! ask for, and the cancel requests anyone can publish (`docs/protocol.md`,
//! `docs/schemas/event.v1.schema.json`, `docs/schemas/cancel.v1.schema.json`).

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, JobError};
use crate::job::PROTOCOL_VERSION;

/// `event` of a [`JobEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The job entered a model call (`batch_size` images in it, `steps` steps).
    Started,
    /// The model call finished denoising step `step` of `steps`.
    Progress,
}

/// A transient progress message, published to the results exchange under
/// [`JobEvent::routing_key`] (and to the job's `reply_to`). Best effort: events can be dropped
/// (a broker that pushes back, a full buffer), results cannot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Protocol version (1).
    pub version: u32,
    /// What happened.
    pub event: EventType,
    /// The job.
    pub job_id: String,
    /// Its campaign.
    pub campaign_id: Option<String>,
    /// Denoising steps done (0 in `started`).
    pub step: u32,
    /// Denoising steps of the call.
    pub steps: u32,
    /// Images in the model call.
    pub batch_size: u32,
    /// Seconds since the model call started.
    pub elapsed: f64,
    /// The worker running it.
    pub worker: String,
    /// When the event was made (RFC 3339, UTC).
    pub at: String,
}

impl JobEvent {
    /// `progress.<campaign|none>`: never confused with a result's `<status>.<campaign>`.
    pub fn routing_key(&self) -> String {
        format!("progress.{}", self.campaign_id.as_deref().unwrap_or("none"))
    }
}

/// A cancel request, as `retouch cancel` publishes it to the cancel stream: the jobs named, and
/// every job of the campaign named, that have not finished are settled as `cancelled`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Protocol version (1).
    #[serde(default = "protocol_version")]
    pub version: u32,
    /// Jobs to cancel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<String>,
    /// A campaign to cancel whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// Who asked, for the logs (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

impl Default for CancelRequest {
    /// Version 1, naming nothing yet.
    fn default() -> Self {
        Self { version: PROTOCOL_VERSION, job_ids: Vec::new(), campaign_id: None, requested_by: None }
    }
}

fn protocol_version() -> u32 {
    PROTOCOL_VERSION
}

/// Most job ids in one cancel request.
pub const MAX_CANCEL_JOBS: usize = 10_000;

impl CancelRequest {
    /// Parses and checks a cancel request: at least one job or a campaign, ids of the job
    /// protocol's shapes.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidJob`] naming what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, JobError> {
        if !crate::job::is_json_object(body) {
            return Err(JobError::new(ErrorKind::InvalidJob, "not a valid cancel request: not a JSON object"));
        }
        let request: Self = serde_json::from_slice(body)
            .map_err(|e| JobError::new(ErrorKind::InvalidJob, format!("not a valid cancel request: {e}")))?;
        request.validate()?;
        Ok(request)
    }

    /// Checks the ids and that something is named.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidJob`] naming what is wrong.
    pub fn validate(&self) -> Result<(), JobError> {
        let invalid = |m: String| JobError::new(ErrorKind::InvalidJob, m);
        if self.job_ids.is_empty() && self.campaign_id.is_none() {
            return Err(invalid("a cancel request names job_ids or a campaign_id".into()));
        }
        if self.job_ids.len() > MAX_CANCEL_JOBS {
            return Err(invalid(format!("job_ids: at most {MAX_CANCEL_JOBS} per request")));
        }
        if let Some(id) = self.job_ids.iter().find(|id| !crate::job::valid_job_id(id)) {
            return Err(invalid(format!("job_ids: {id:?} is not a job id ([A-Za-z0-9._:-], 1–128)")));
        }
        if let Some(c) = &self.campaign_id
            && !crate::job::valid_campaign_id(c)
        {
            return Err(invalid(format!("campaign_id {c:?}: must be 1–64 characters of [A-Za-z0-9_-]")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_requests_name_something_valid() {
        let ok = CancelRequest::parse(br#"{"job_ids":["a-1","b.2"]}"#).expect("valid");
        assert_eq!((ok.version, ok.job_ids.len(), ok.campaign_id), (1, 2, None));
        CancelRequest::parse(br#"{"version":1,"campaign_id":"spring"}"#).expect("campaign");
        for (body, needle) in [
            (&br#"{}"#[..], "names job_ids or a campaign_id"),
            (br#"{"job_ids":["a b"]}"#, "not a job id"),
            (br#"{"campaign_id":"x/y"}"#, "campaign_id"),
            (br#"{"job_ids":["a"],"colour":1}"#, "colour"),
            (br#"[1]"#, "not a valid cancel request"),
        ] {
            let e = CancelRequest::parse(body).expect_err("invalid");
            assert!(e.message.contains(needle), "{}: {}", String::from_utf8_lossy(body), e.message);
        }
    }

    #[test]
    fn events_route_apart_from_results() {
        let e = JobEvent {
            version: 1,
            event: EventType::Progress,
            job_id: "a".into(),
            campaign_id: Some("c".into()),
            step: 3,
            steps: 10,
            batch_size: 2,
            elapsed: 1.5,
            worker: "w".into(),
            at: "2026-12-06T00:00:00Z".into(),
        };
        assert_eq!(e.routing_key(), "progress.c");
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "progress");
    }
}
