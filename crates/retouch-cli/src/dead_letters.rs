//! `retouch dead-letters list|redrive`: see why jobs died, and send them back once the cause is
//! fixed.

use std::collections::BTreeMap;

use anyhow::Context;
use retouch_amqp::{Admin, Disposition};

use crate::campaign::Connection;

/// Which dead letters a command applies to.
#[derive(clap::Args, Debug, Clone)]
pub struct Filter {
    /// Only jobs of this campaign.
    #[arg(long)]
    pub campaign: Option<String>,
    /// Only this reason: an error kind (source_not_found, storage, …) or a RabbitMQ reason
    /// (delivery_limit).
    #[arg(long)]
    pub reason: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, letter: &retouch_amqp::DeadLetter) -> bool {
        self.campaign.as_ref().is_none_or(|c| letter.campaign_id.as_ref() == Some(c))
            && self.reason.as_ref().is_none_or(|r| &letter.reason == r)
    }
}

/// `retouch dead-letters` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DeadLetterCommand {
    /// Show dead-lettered jobs with their reasons (they stay in the queue).
    List {
        #[command(flatten)]
        filter: Filter,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Re-publish dead-lettered jobs (all, or those matching the filter) to the jobs queue.
    Redrive {
        #[command(flatten)]
        filter: Filter,
        /// Show what would be re-driven and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

async fn admin(connection: &Connection) -> anyhow::Result<Admin> {
    let config = connection.config()?;
    Admin::connect(config.amqp_for("dead-letters")).await.context("cannot connect to the broker")
}

/// Runs a `retouch dead-letters` subcommand.
///
/// # Errors
/// Broker failures.
pub async fn run(command: DeadLetterCommand) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List { filter, json, connection } => {
            let admin = admin(&connection).await?;
            let mut shown = 0usize;
            let mut tally: BTreeMap<(String, String), usize> = BTreeMap::new();
            if !json {
                println!("{:<40} {:<20} {:<18} {:>7}  message", "job_id", "campaign", "reason", "attempt");
            }
            let summary = admin
                .dead_letter_pass(None, |l| {
                    if filter.matches(l) && filter.limit.is_none_or(|n| shown < n) {
                        shown += 1;
                        *tally.entry(l.group()).or_insert(0) += 1;
                        if json {
                            let line = serde_json::json!({
                                "job_id": l.job_id, "message_id": l.message_id, "campaign_id": l.campaign_id,
                                "reason": l.reason, "message": l.message, "attempt": l.attempt,
                                "dead_lettered_at": l.dead_lettered_at,
                                "body": String::from_utf8_lossy(&l.body),
                            });
                            println!("{line}");
                        } else {
                            println!(
                                "{:<40} {:<20} {:<18} {:>7}  {}",
                                l.job_id.as_deref().or(l.message_id.as_deref()).unwrap_or("(unparsable)"),
                                l.campaign_id.as_deref().unwrap_or("-"),
                                l.reason,
                                l.attempt.map_or("-".into(), |a| a.to_string()),
                                l.message.chars().take(100).collect::<String>()
                            );
                        }
                    }
                    Disposition::Keep
                })
                .await?;
            admin.close().await;
            if !json {
                println!("{shown} shown of {} dead letters", summary.seen);
                for ((campaign, reason), n) in tally {
                    println!("  {n:>6}  campaign {campaign}, reason {reason}");
                }
            }
        }
        DeadLetterCommand::Redrive { filter, dry_run, connection } => {
            let admin = admin(&connection).await?;
            let mut selected = 0usize;
            let summary = admin
                .dead_letter_pass(None, |l| {
                    if filter.matches(l) && filter.limit.is_none_or(|n| selected < n) {
                        selected += 1;
                        if dry_run {
                            println!("would re-drive {} ({})", l.job_id.as_deref().unwrap_or("(unparsable)"), l.reason);
                            return Disposition::Keep;
                        }
                        return Disposition::Redrive;
                    }
                    Disposition::Keep
                })
                .await?;
            admin.close().await;
            if dry_run {
                println!("dry run: {selected} of {} dead letters match; nothing was changed", summary.seen);
            } else {
                println!("re-drove {} of {} dead letters to the jobs queue", summary.redriven, summary.seen);
            }
        }
    }
    Ok(())
}
