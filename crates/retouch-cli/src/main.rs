//! `retouch`: edit images from plain-language instructions with InstructPix2Pix.
//!
//! Subcommands are thin: they parse flags, pick the real implementations and call into the
//! library crates. Errors are reported as one line; the exit code is 0 on success, 2 when the
//! command line or its inputs are wrong (missing file, not an image, unknown scheduler…), 1
//! otherwise.

mod allocator;
mod batch;
mod bench;
mod campaign;
mod cancel;
mod cli_error;
mod config;
mod dead_letters;
mod edit;
mod ledger;
mod logging;
mod manifest;
mod model;
mod params;
mod progress;
mod relay;
mod signals;
mod storage;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cli_error::exit_code;

/// Edit images from plain-language instructions (InstructPix2Pix on candle).
#[derive(Parser, Debug)]
#[command(name = "retouch", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text, env = "RETOUCH_LOG_FORMAT")]
    log_format: logging::LogFormat,

    /// More logging (-v: debug, -vv: trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// CPU threads for inference [default: all cores]. Same as RAYON_NUM_THREADS.
    #[arg(long, global = true)]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Edit one image.
    Edit(Box<edit::EditArgs>),
    /// Consume edit jobs from RabbitMQ, read and write images on S3, publish results.
    Worker(Box<worker::WorkerArgs>),
    /// Download a model into its cache once (for init containers), print its directory.
    FetchModel(Box<worker::FetchModelArgs>),
    /// Publish a campaign's jobs from a manifest or an S3 prefix.
    Submit(Box<campaign::SubmitArgs>),
    /// Follow a campaign's results to a report.
    Watch(Box<campaign::WatchArgs>),
    /// Cancel jobs or a campaign: queued, batched or running.
    Cancel(Box<cancel::CancelArgs>),
    /// List or re-drive dead-lettered jobs.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLetterCommand),
    /// Edit a folder or manifest of images on this machine (no broker, no S3).
    Batch(Box<batch::BatchArgs>),
    /// Time the model's stages (text encoding, VAE, one UNet call, whole edit) on this machine.
    Bench(Box<bench::BenchArgs>),
}

/// The async runtime of the long-running commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("retouch-io").build()?)
}

fn main() -> ExitCode {
    let malloc_tuned = allocator::tune_for_tensors();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // candle's CPU kernels size their thread pools from RAYON_NUM_THREADS when first used.
        // SAFETY: no other thread exists yet (nothing has been spawned before this point).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
        }
    }
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && std::env::var_os("GOMP_SPINCOUNT").is_none() {
        // oneDNN (bf16 on the CPU) runs on OpenMP threads, which by default spin for up to a
        // few milliseconds after each call and starve the rayon threads of the f32 work between
        // calls; sleeping at once costs a wake-up per call instead. A short spin, then sleep, was
        // fastest (docs/benchmarks.md).
        // SAFETY: still single-threaded, as above.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("OMP_WAIT_POLICY", "passive");
            std::env::set_var("GOMP_SPINCOUNT", "30000");
        }
    }
    let quiet = matches!(
        cli.command,
        Command::Batch(_) | Command::Submit(_) | Command::Watch(_) | Command::Cancel(_) | Command::DeadLetters(_)
    );
    logging::init(cli.log_format, cli.verbose, quiet);
    tracing::debug!(malloc_tuned, "allocator");
    let result = match cli.command {
        Command::Edit(args) => edit::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::Worker(args) => runtime().and_then(|rt| rt.block_on(worker::run(*args))),
        Command::FetchModel(args) => runtime().and_then(|rt| rt.block_on(worker::fetch_model(*args))),
        Command::Submit(args) => runtime().and_then(|rt| rt.block_on(campaign::submit(*args))),
        Command::Watch(args) => runtime().and_then(|rt| rt.block_on(campaign::watch(*args))),
        Command::Cancel(args) => runtime().and_then(|rt| rt.block_on(cancel::run(*args))),
        Command::DeadLetters(cmd) => runtime().and_then(|rt| rt.block_on(dead_letters::run(cmd))),
        Command::Batch(args) => runtime().and_then(|rt| rt.block_on(batch::run(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let line = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::from(exit_code(&error))
        }
    }
}
