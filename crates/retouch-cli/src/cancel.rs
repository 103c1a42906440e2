//! `retouch cancel`: cancel jobs, or a whole campaign, wherever they are — queued, waiting for
//! a batch, or inside a running model call.
//!
//! The request goes to the cancel stream (`docs/protocol.md`, "Cancelling"), which every
//! worker reads, including workers started later (for `amqp.cancel_retention`). A job whose
//! output already exists under its default location has finished: it is reported and left out
//! of the request, so cancelling it changes nothing.

use std::sync::Arc;

use anyhow::Context;
use retouch_amqp::AmqpPublisher;
use retouch_core::events::CancelRequest;
use retouch_core::job::{default_output, valid_campaign_id, valid_job_id};
use retouch_core::params::OutputFormat;
use retouch_core::queue::QueueCounters;
use retouch_core::store::ObjectStore;
use retouch_s3::S3Store;
use retouch_worker::engine::meta;

use crate::campaign::Connection;
use crate::cli_error::bad_input;

/// Flags of `retouch cancel`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["job", "campaign"])))]
pub struct CancelArgs {
    /// A job to cancel (repeat for several).
    #[arg(long = "job", value_name = "JOB_ID")]
    pub job: Vec<String>,
    /// Cancel every unfinished job of this campaign.
    #[arg(long)]
    pub campaign: Option<String>,
    /// Do not look for finished jobs' outputs (no S3 access).
    #[arg(long)]
    pub no_check: bool,
    #[command(flatten)]
    pub connection: Connection,
}

/// Runs `retouch cancel`.
///
/// # Errors
/// Bad input for malformed ids; broker failures.
pub async fn run(args: CancelArgs) -> anyhow::Result<()> {
    if let Some(id) = args.job.iter().find(|id| !valid_job_id(id)) {
        return Err(bad_input(format!("--job {id:?}: not a job id ([A-Za-z0-9._:-], 1–128 characters)")));
    }
    if let Some(c) = args.campaign.as_deref().filter(|c| !valid_campaign_id(c)) {
        return Err(bad_input(format!("--campaign {c:?}: must be 1–64 characters of [A-Za-z0-9_-]")));
    }
    let config = args.connection.config()?;
    let mut jobs = Vec::with_capacity(args.job.len());
    let s3 = if args.no_check || args.job.is_empty() || !config.engine.output_prefix.starts_with("s3://") {
        None
    } else {
        S3Store::new(config.s3.clone()).await.map_err(|e| tracing::warn!(error = %e, "cannot check outputs")).ok()
    };
    for id in &args.job {
        match finished_output(s3.as_ref(), &config.engine.output_prefix, id).await {
            Some(output) => println!("job {id}: already finished ({output}); nothing changed"),
            None => jobs.push(id.clone()),
        }
    }
    if jobs.is_empty() && args.campaign.is_none() {
        println!("nothing to cancel");
        return Ok(());
    }
    let request = CancelRequest {
        job_ids: jobs,
        campaign_id: args.campaign.clone(),
        requested_by: Some(format!("retouch cancel on {}", crate::worker::host_name())),
        ..CancelRequest::default()
    };
    request.validate().map_err(|e| bad_input(e.message))?;
    let settings = config.amqp_for("cancel");
    let retention = settings.cancel_retention;
    let publisher = AmqpPublisher::connect(settings, Arc::new(QueueCounters::default()))
        .await
        .context("cannot connect to the broker")?;
    publisher.publish_cancel(&request).await.context("publishing the cancel request")?;
    publisher.shutdown().await;
    let mut what = Vec::new();
    if !request.job_ids.is_empty() {
        what.push(format!("{} job(s): {}", request.job_ids.len(), request.job_ids.join(", ")));
    }
    if let Some(c) = &request.campaign_id {
        what.push(format!("campaign {c}"));
    }
    println!(
        "cancel requested for {}; unfinished jobs are settled as cancelled (in force for {})",
        what.join(" and "),
        humantime::format_duration(retention)
    );
    Ok(())
}

/// The job's default output, if it exists and was written by this job.
async fn finished_output(s3: Option<&S3Store>, prefix: &str, job_id: &str) -> Option<String> {
    let s3 = s3?;
    for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
        let Ok(url) = default_output(prefix, job_id, format) else { continue };
        if let Ok(Some(head)) = s3.head(&url).await
            && head.metadata.get(meta::JOB_ID).map(String::as_str) == Some(job_id)
        {
            return Some(url.to_string());
        }
    }
    None
}
