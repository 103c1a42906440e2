//! The job protocol, version 1: the edit job and its result, as JSON.
//!
//! Other programs publish jobs and consume results, so these shapes are a contract
//! (`docs/protocol.md`, `docs/schemas/*.json`). Parsing is strict: an unknown key is an
//! invalid job whose error names the key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, JobError};
use crate::params::{EditParams, MAX_TEXT_BYTES, OutputFormat, ResolvedParams};

/// Protocol version carried by results, events and cancel requests. The additions since the
/// first release (job `priority`, `events`, `webhook`; result status `cancelled`; progress
/// events; cancel requests) are optional, so version 1 still describes every message.
pub const PROTOCOL_VERSION: u32 = 1;

/// An edit job as published to `retouch.jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditJob {
    /// Caller-chosen id: 1–128 characters of `[A-Za-z0-9._:-]`. Names the default output and
    /// seeds the noise when `params.seed` is absent.
    pub job_id: String,
    /// Input image location, `s3://bucket/key`.
    pub source: String,
    /// The edit, in plain language.
    pub instruction: String,
    /// Output location; default `<output_prefix>/<job_id>.<ext>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Campaign the job belongs to: `[A-Za-z0-9_-]{1,64}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// Edit parameters; absent ones take `retouch edit`'s defaults.
    #[serde(default)]
    pub params: EditParams,
    /// Free-form string pairs echoed in the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Scheduling class: `high` jobs go to the high-priority queue, which workers drain
    /// first (`retouch submit --priority high` publishes there). Absent = `normal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Events the job wants besides its result: `["progress"]` asks for `started` and
    /// throttled `progress` messages (routing key `progress.<campaign|none>`, and `reply_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventKind>>,
    /// Where to POST the result, signed as Standard Webhooks says; the host must be on the
    /// worker's allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTarget>,
}

/// `priority` of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// The bulk of a campaign.
    #[default]
    Normal,
    /// Interactive work: taken before every normal job a worker holds or will receive.
    High,
}

impl Priority {
    /// The protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::High => "high",
        }
    }
}

/// An event a job can subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `started` when the job enters a model call, then `progress` per denoising step (at most
    /// one a second, and always the last step).
    Progress,
}

/// `webhook` of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    /// `https://host[:port]/path` on the worker's `webhooks.allow_hosts`.
    pub url: String,
}

/// Longest accepted webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// An `s3://bucket/key` (or, in local mode, `file:///path`) location, split.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectUrl {
    /// `s3` or `file`.
    pub scheme: String,
    /// Bucket (empty for `file`).
    pub bucket: String,
    /// Key (the path for `file`).
    pub key: String,
}

impl ObjectUrl {
    /// Parses `s3://bucket/key` or `file:///absolute/path`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').ok_or_else(|| format!("{url:?}: expected s3://bucket/key"))?;
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !bucket_ok {
                return Err(format!("{url:?}: invalid bucket name {bucket:?}"));
            }
            if key.is_empty() || key.len() > 1024 {
                return Err(format!("{url:?}: the key must be 1–1024 bytes"));
            }
            Ok(Self { scheme: "s3".into(), bucket: bucket.into(), key: key.into() })
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("{url:?}: expected file:///absolute/path"));
            }
            Ok(Self { scheme: "file".into(), bucket: String::new(), key: path.into() })
        } else {
            Err(format!("{url:?}: expected s3://bucket/key"))
        }
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheme.as_str() {
            "file" => write!(f, "file://{}", self.key),
            scheme => write!(f, "{scheme}://{}/{}", self.bucket, self.key),
        }
    }
}

fn valid_id(s: &str, max: usize, extra: &str) -> bool {
    (1..=max).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// A job id: 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn valid_job_id(s: &str) -> bool {
    valid_id(s, 128, "._:-")
}

/// A campaign id: 1–64 characters of `[A-Za-z0-9_-]` (it is part of routing keys and queue names).
pub fn valid_campaign_id(s: &str) -> bool {
    valid_id(s, 64, "_-")
}

/// A job that passed validation, with its parameters resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidJob {
    /// The job as received.
    pub job: EditJob,
    /// Parameters with defaults; the seed derived from the job id when absent.
    pub params: ResolvedParams,
    /// Where the input is.
    pub source: ObjectUrl,
    /// Where the output goes.
    pub output: ObjectUrl,
}

/// The seed of a job without one: stable across retries and workers (FNV-1a of the job id,
/// low 32 bits, which is all torch's CPU generator uses).
pub fn derived_seed(job_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & 0xffff_ffff
}

fn invalid(message: impl Into<String>) -> JobError {
    JobError::new(ErrorKind::InvalidJob, message)
}

/// Parses a job body.
///
/// # Errors
/// [`ErrorKind::InvalidJob`] for anything but a JSON object of the protocol's shape; serde's
/// message names an unknown or missing key.
pub fn parse_job(body: &[u8]) -> Result<EditJob, JobError> {
    // serde would also read a struct from a JSON array (its sequence form): only objects are jobs.
    if !is_json_object(body) {
        return Err(invalid("not a valid job: not a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("not a valid job: {e}")))
}

/// What can be read from a job that is not valid, for routing its failure result: its id and
/// campaign when the body is a JSON object carrying well-formed ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `job_id`, when it is a valid job id.
    pub job_id: Option<String>,
    /// `campaign_id`, when it is a valid campaign id.
    pub campaign_id: Option<String>,
}

impl Envelope {
    /// Best-effort read of `body`'s `job_id` and `campaign_id`; never fails.
    pub fn read(body: &[u8]) -> Self {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Self::default();
        };
        let field = |name: &str, valid: fn(&str) -> bool| {
            map.get(name).and_then(serde_json::Value::as_str).filter(|v| valid(v)).map(str::to_string)
        };
        Self { job_id: field("job_id", valid_job_id), campaign_id: field("campaign_id", valid_campaign_id) }
    }
}

/// Whether `body` starts (after JSON whitespace) like a JSON object.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'{')
}

impl EditJob {
    /// Whether the job asked for progress events.
    pub fn wants_progress(&self) -> bool {
        self.events.as_ref().is_some_and(|e| e.contains(&EventKind::Progress))
    }

    /// The job's priority (`normal` when absent).
    pub fn priority(&self) -> Priority {
        self.priority.unwrap_or_default()
    }
}

impl EditJob {
    /// Checks the fields the type does not enforce and resolves the parameters. Outputs
    /// default to `<output_prefix>/<job_id>.<ext>`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidJob`] naming the offending field.
    pub fn validate(self, output_prefix: &str) -> Result<ValidJob, JobError> {
        if !valid_job_id(&self.job_id) {
            return Err(invalid(format!("job_id {:?}: must be 1–128 characters of [A-Za-z0-9._:-]", self.job_id)));
        }
        if let Some(c) = &self.campaign_id
            && !valid_campaign_id(c)
        {
            return Err(invalid(format!("campaign_id {c:?}: must be 1–64 characters of [A-Za-z0-9_-]")));
        }
        if self.instruction.trim().is_empty() {
            return Err(invalid("instruction: must not be empty"));
        }
        if self.instruction.len() > MAX_TEXT_BYTES {
            return Err(invalid(format!("instruction: longer than {MAX_TEXT_BYTES} bytes")));
        }
        let source = ObjectUrl::parse(&self.source).map_err(|e| invalid(format!("source: {e}")))?;
        let job_id = self.job_id.clone();
        let params = self
            .params
            .resolve(|| derived_seed(&job_id))
            .map_err(|e| invalid(format!("params.{}: {}", e.field, e.message)))?;
        if let Some(hook) = &self.webhook
            && (hook.url.is_empty() || hook.url.len() > MAX_WEBHOOK_URL_BYTES)
        {
            return Err(invalid(format!("webhook.url: must be 1–{MAX_WEBHOOK_URL_BYTES} bytes")));
        }
        let output = match &self.output {
            Some(url) => ObjectUrl::parse(url).map_err(|e| invalid(format!("output: {e}")))?,
            None => default_output(output_prefix, &self.job_id, params.format)
                .map_err(|e| invalid(format!("no output given and the default prefix is unusable: {e}")))?,
        };
        Ok(ValidJob { job: self, params, source, output })
    }
}

/// `<prefix>/<job_id>.<ext>`.
///
/// # Errors
/// When `prefix` is not an `s3://bucket[/path]` (or `file:///dir`) prefix.
pub fn default_output(prefix: &str, job_id: &str, format: OutputFormat) -> Result<ObjectUrl, String> {
    let prefix = prefix.trim_end_matches('/');
    ObjectUrl::parse(&format!("{prefix}/{job_id}.{}", format.extension()))
}

/// Per-stage durations of a job, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From publication (AMQP `timestamp`) to delivery, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_wait: Option<f64>,
    /// Downloading the input.
    #[serde(default)]
    pub fetch: f64,
    /// Decoding and resizing the input.
    #[serde(default)]
    pub decode: f64,
    /// The model's share: the batch's inference time.
    #[serde(default)]
    pub inference: f64,
    /// Encoding the output.
    #[serde(default)]
    pub encode: f64,
    /// Uploading the output.
    #[serde(default)]
    pub upload: f64,
    /// From delivery to the result.
    #[serde(default)]
    pub total: f64,
}

/// `status` of a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The output exists.
    Succeeded,
    /// The job will not produce an output (this attempt was final).
    Failed,
    /// The job was cancelled (`retouch cancel`) before its output was written; it wrote none.
    Cancelled,
}

impl Status {
    /// The routing-key word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The error object of a failed result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    /// One of the protocol's error kinds.
    pub kind: ErrorKind,
    /// Human-readable cause.
    pub message: String,
    /// Whether the same job could succeed later (it was still given up on: this was the last
    /// attempt).
    pub retryable: bool,
}

/// A result as published to `retouch.results` (and `reply_to`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Protocol version (1).
    pub version: u32,
    /// The job's id (for an unparsable job: the AMQP `message_id`, or empty).
    pub job_id: String,
    /// The job's campaign.
    pub campaign_id: Option<String>,
    /// Outcome.
    pub status: Status,
    /// The input location, when known.
    pub source: Option<String>,
    /// Output location (on success).
    pub output: Option<String>,
    /// Output width in pixels.
    pub width: Option<u32>,
    /// Output height in pixels.
    pub height: Option<u32>,
    /// Seed used.
    pub seed: Option<u64>,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// The output already existed from an earlier delivery of this job; nothing was redone.
    pub duplicate: bool,
    /// The safety checker's verdict on the edited image (diffusers' `nsfw_content_detected`):
    /// `null` when no checker ran (none configured, or the job failed before inference), `true`
    /// when it flagged the image — black on success, or the `nsfw` failure under `block`.
    pub nsfw_content_detected: Option<bool>,
    /// Worker identity (host name by default).
    pub worker: String,
    /// Model the worker runs.
    pub model: String,
    /// Stage durations.
    pub timings: Timings,
    /// Why it failed.
    pub error: Option<ResultError>,
    /// The job's metadata, echoed.
    pub metadata: Option<BTreeMap<String, String>>,
}

impl JobResult {
    /// A protocol-v1 result of `job_id` with `status`, attempt 1 and every other field empty
    /// (no campaign, locations, size, seed, error, metadata or timings; empty worker and
    /// model): the one base that producers and tests fill in with struct-update syntax,
    /// `JobResult { output: Some(…), ..JobResult::new("a", Status::Succeeded) }`, so a new
    /// field gets its default here only.
    pub fn new(job_id: impl Into<String>, status: Status) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            job_id: job_id.into(),
            campaign_id: None,
            status,
            source: None,
            output: None,
            width: None,
            height: None,
            seed: None,
            attempt: 1,
            duplicate: false,
            nsfw_content_detected: None,
            worker: String::new(),
            model: String::new(),
            timings: Timings::default(),
            error: None,
            metadata: None,
        }
    }

    /// The `retouch.results` routing key: `<status>.<campaign_id or "none">`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.status.as_str(), self.campaign_id.as_deref().unwrap_or("none"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(json: &str) -> Result<ValidJob, JobError> {
        parse_job(json.as_bytes())?.validate("s3://outputs/edits")
    }

    #[test]
    fn minimal_job_gets_defaults_and_a_derived_seed() {
        let v = job(r#"{"job_id":"a-1","source":"s3://inputs/x.png","instruction":"make it snowy"}"#).expect("valid");
        assert_eq!(v.output.to_string(), "s3://outputs/edits/a-1.png");
        assert_eq!(v.params.seed, derived_seed("a-1"));
        assert_eq!(v.params.steps, 20);
        assert!(v.params.seed < 1 << 32);
    }

    #[test]
    fn invalid_jobs_name_the_problem() {
        for (body, needle) in [
            (r#"not json"#, "not a valid job"),
            (r#"["a","s3://inputs/x.png","x"]"#, "not a JSON object"),
            (r#"{"source":"s3://inputs/x.png","instruction":"x"}"#, "job_id"),
            (r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","colour":"red"}"#, "colour"),
            (r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","params":{"scheduler":"pndm"}}"#, "pndm"),
            (r#"{"job_id":"a b","source":"s3://inputs/x.png","instruction":"x"}"#, "job_id"),
            (r#"{"job_id":"a","source":"http://x/y.png","instruction":"x"}"#, "source"),
            (r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"  "}"#, "instruction"),
            (r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","campaign_id":"c/1"}"#, "campaign_id"),
            (r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","params":{"steps":0}}"#, "params.steps"),
            (
                r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","params":{"scheduler":"ddim","karras_sigmas":true}}"#,
                "params.karras_sigmas",
            ),
            (
                r#"{"job_id":"a","source":"s3://inputs/x.png","instruction":"x","params":{"karras_sigmas":"yes"}}"#,
                "expected a boolean",
            ),
        ] {
            let e = job(body).expect_err(body);
            assert_eq!(e.kind, ErrorKind::InvalidJob, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn an_invalid_job_still_names_its_id_and_campaign_when_it_can() {
        let e = Envelope::read(br#"{"job_id":"j-1","campaign_id":"spring","instruction":"x"}"#);
        assert_eq!((e.job_id.as_deref(), e.campaign_id.as_deref()), (Some("j-1"), Some("spring")));
        let e = Envelope::read(br#"{"job_id":"has space","campaign_id":7}"#);
        assert_eq!(e, Envelope::default());
        assert_eq!(Envelope::read(b"[1,2]"), Envelope::default());
        assert_eq!(Envelope::read(b"\xff\xfe"), Envelope::default());
    }

    #[test]
    fn negative_prompts_are_bounded_like_the_instruction() {
        let body = |text: &str| {
            format!(
                r#"{{"job_id":"n","source":"s3://inputs/x.png","instruction":"x","params":{{"negative_prompt":"{text}"}}}}"#
            )
        };
        let ok = job(&body(&"b".repeat(MAX_TEXT_BYTES))).expect("at the limit");
        assert_eq!(ok.params.negative_prompt.as_ref().map(String::len), Some(MAX_TEXT_BYTES));
        let e = job(&body(&"b".repeat(MAX_TEXT_BYTES + 1))).expect_err("over the limit");
        assert_eq!(e.kind, ErrorKind::InvalidJob);
        assert!(e.message.contains("params.negative_prompt") && e.message.contains("4096"), "{}", e.message);
        let e = job(&format!(
            r#"{{"job_id":"n","source":"s3://inputs/x.png","instruction":"{}"}}"#,
            "i".repeat(MAX_TEXT_BYTES + 1)
        ))
        .expect_err("long instruction");
        assert!(e.message.contains("instruction") && e.message.contains("4096"), "{}", e.message);
    }

    #[test]
    fn result_routing_key_and_json_shape() {
        let r = JobResult {
            error: Some(ResultError {
                kind: ErrorKind::SourceNotFound,
                message: "no such key".into(),
                retryable: false,
            }),
            ..JobResult::new("a", Status::Failed)
        };
        assert_eq!(r.routing_key(), "failed.none");
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v["error"]["kind"], "source_not_found");
        assert_eq!(v["status"], "failed");
    }
}

#[cfg(test)]
mod schema_tests {
    //! Keeps `docs/schemas/*.json` and `docs/protocol.md` in step with the types.

    use std::collections::BTreeSet;

    use super::*;
    use crate::error::ErrorKind;

    fn schema(name: &str) -> serde_json::Value {
        let path = format!("{}/../../docs/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("schema file")).expect("schema json")
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("object").keys().cloned().collect()
    }

    fn full_job() -> EditJob {
        let mut job = parse_job(
            br#"{"job_id":"a","source":"s3://bkt/x.png","instruction":"x","output":"s3://bkt/y.png","campaign_id":"c",
                "params":{"steps":1,"guidance_scale":1,"image_guidance_scale":1,"negative_prompt":"blurry","seed":1,
                "scheduler":"unipc","karras_sigmas":true,"max_side":64,"format":"png","quality":9},"metadata":{"k":"v"},
                "priority":"high","events":["progress"],"webhook":{"url":"https://hooks.example.com/r"}}"#,
        )
        .expect("valid");
        job.metadata = Some([("k".to_string(), "v".to_string())].into());
        job
    }

    #[test]
    fn job_schema_matches_the_type() {
        let s = schema("job.v1.schema.json");
        let job = serde_json::to_value(full_job()).expect("json");
        assert_eq!(keys(&s["properties"]), keys(&job));
        assert_eq!(keys(&s["properties"]["params"]["properties"]), keys(&job["params"]));
        let required: BTreeSet<String> =
            s["required"].as_array().expect("required").iter().map(|v| v.as_str().expect("str").to_string()).collect();
        assert_eq!(required, ["job_id", "source", "instruction"].map(String::from).into());
        let params = &s["properties"]["params"]["properties"];
        let names: Vec<&str> = crate::params::SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(params["scheduler"]["enum"], serde_json::json!(names));
        assert_eq!(params["karras_sigmas"]["type"], "boolean");
        assert_eq!(params["negative_prompt"]["type"], "string");
        assert_eq!(params["negative_prompt"]["maxLength"], serde_json::json!(MAX_TEXT_BYTES));
        assert_eq!(s["properties"]["instruction"]["maxLength"], serde_json::json!(MAX_TEXT_BYTES));
    }

    #[test]
    fn result_schema_matches_the_type() {
        let s = schema("result.v1.schema.json");
        let result = JobResult {
            timings: Timings { queue_wait: Some(1.0), ..Timings::default() },
            ..JobResult::new("a", Status::Succeeded)
        };
        let v = serde_json::to_value(&result).expect("json");
        assert_eq!(keys(&s["properties"]), keys(&v));
        let required: BTreeSet<String> =
            s["required"].as_array().expect("required").iter().map(|v| v.as_str().expect("str").to_string()).collect();
        assert_eq!(required, keys(&v), "every result key is always present");
        assert_eq!(keys(&s["properties"]["timings"]["properties"]), keys(&v["timings"]));
        let kinds: Vec<String> = ErrorKind::ALL.iter().map(|k| k.as_str().to_string()).collect();
        assert_eq!(s["properties"]["error"]["oneOf"][1]["properties"]["kind"]["enum"], serde_json::json!(kinds));
    }

    #[test]
    fn job_schema_describes_the_additions() {
        let s = schema("job.v1.schema.json");
        assert_eq!(s["properties"]["priority"]["enum"], serde_json::json!(["normal", "high"]));
        assert_eq!(s["properties"]["events"]["items"]["enum"], serde_json::json!(["progress"]));
        assert_eq!(
            s["properties"]["webhook"]["properties"]["url"]["maxLength"],
            serde_json::json!(MAX_WEBHOOK_URL_BYTES)
        );
        let job = full_job();
        assert_eq!((job.priority(), job.wants_progress()), (Priority::High, true));
        // Old jobs are still valid and mean the same.
        let old = parse_job(br#"{"job_id":"a","source":"s3://bkt/x.png","instruction":"x"}"#).expect("v1 job");
        assert_eq!((old.priority(), old.wants_progress(), old.webhook), (Priority::Normal, false, None));
    }

    #[test]
    fn result_schema_knows_every_status() {
        let s = schema("result.v1.schema.json");
        let statuses: Vec<&str> = [Status::Succeeded, Status::Failed, Status::Cancelled].map(Status::as_str).to_vec();
        assert_eq!(s["properties"]["status"]["enum"], serde_json::json!(statuses));
    }

    #[test]
    fn event_and_cancel_schemas_match_the_types() {
        use crate::events::{CancelRequest, EventType, JobEvent};
        let s = schema("event.v1.schema.json");
        let event = JobEvent {
            version: 1,
            event: EventType::Started,
            job_id: "a".into(),
            campaign_id: None,
            step: 0,
            steps: 1,
            batch_size: 1,
            elapsed: 0.0,
            worker: "w".into(),
            at: "2026-12-06T00:00:00Z".into(),
        };
        let v = serde_json::to_value(&event).expect("json");
        assert_eq!(keys(&s["properties"]), keys(&v));
        assert_eq!(s["properties"]["event"]["enum"], serde_json::json!(["started", "progress"]));
        let s = schema("cancel.v1.schema.json");
        let request = CancelRequest {
            job_ids: vec!["a".into()],
            campaign_id: Some("c".into()),
            requested_by: Some("me".into()),
            ..CancelRequest::default()
        };
        assert_eq!(keys(&s["properties"]), keys(&serde_json::to_value(&request).expect("json")));
        assert_eq!(s["properties"]["job_ids"]["maxItems"], serde_json::json!(crate::events::MAX_CANCEL_JOBS));
    }

    #[test]
    fn the_protocol_doc_example_job_is_valid() {
        let doc =
            std::fs::read_to_string(format!("{}/../../docs/protocol.md", env!("CARGO_MANIFEST_DIR"))).expect("doc");
        let start = doc.find("{\"job_id\": \"sku-1042-snow\"").expect("example job");
        let end = start + doc[start..].find("```").expect("end of block");
        let job = parse_job(&doc.as_bytes()[start..end]).expect("the example parses");
        job.validate("s3://out").expect("the example is valid");
    }
}
