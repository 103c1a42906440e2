//! `retouch-test-s3 --host H --port P --access-key AK --secret-key SK ROOT`: an S3 server for
//! the integration tests — every folder under `ROOT` is a bucket — that checks AWS Signature
//! Version 4 on every request, so a test that signs wrongly fails as it would against S3.
//!
//! It is s3s-fs's own server (the s3s protocol layer over a directory, with s3s's `SimpleAuth`)
//! with the same flags, compiled inside the workspace so that its dependencies (tokio, hyper,
//! …) are built once with everything else instead of by a separate `cargo install`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s_fs::FileSystem;
use tokio::net::TcpListener;

/// The command line: s3s-fs's flags.
struct Options {
    /// Address to listen on.
    host: String,
    /// Port to listen on.
    port: u16,
    /// The one access key the server accepts.
    access_key: String,
    /// Its secret key.
    secret_key: String,
    /// The folder whose subfolders are the buckets.
    root: PathBuf,
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    let (mut host, mut port, mut access_key, mut secret_key, mut root) =
        ("127.0.0.1".to_string(), 8014, None, None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--host" => host = value()?,
            "--port" => port = value()?.parse().context("--port")?,
            "--access-key" => access_key = Some(value()?),
            "--secret-key" => secret_key = Some(value()?),
            flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
            path => root = Some(PathBuf::from(path)),
        }
    }
    let (Some(access_key), Some(secret_key)) = (access_key, secret_key) else {
        bail!("--access-key and --secret-key are required: this server always checks signatures")
    };
    let root = root.context("usage: retouch-test-s3 [--host H] [--port P] --access-key AK --secret-key SK ROOT")?;
    Ok(Options { host, port, access_key, secret_key, root })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse(std::env::args().skip(1))?;
    let fs = FileSystem::new(&options.root)
        .map_err(|e| anyhow::anyhow!("cannot serve {}: {e:?}", options.root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(options.access_key, options.secret_key));
    let service = builder.build();

    let listener = TcpListener::bind((options.host.as_str(), options.port)).await?;
    eprintln!("server is running at http://{}", listener.local_addr()?);
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    continue;
                }
            },
            _ = stop.as_mut() => break,
        };
        let connection = graceful.watch(http.serve_connection(TokioIo::new(socket), service.clone()).into_owned());
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
    }
    Ok(())
}
