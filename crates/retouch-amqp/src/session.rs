//! [`Session`]: the one way this crate opens the broker — a named connection (bounded by
//! [`CONNECT_TIMEOUT`]), the topology declared or checked on a throwaway channel, and a
//! publisher-confirm channel — and [`OpenError`], which says whether a failed open is worth
//! another attempt. The source, the publisher and the operator tools all open sessions here.
//!
//! lapin 4's automatic recovery is young (fixes through 4.12.3 for recovery after a broker
//! restart), so it stays off: each owner rebuilds its session itself after the backoff of
//! [`AmqpSettings::reconnect_backoff`].

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use retouch_core::backoff::Backoff;
use retouch_core::queue::QueueError;
use retouch_core::redact::redact_url;

use crate::settings::AmqpSettings;
use crate::topology::{TopologyError, declare_topology, short};

/// How long one TCP + AMQP handshake may take before the attempt counts as failed (a
/// black-holed host would otherwise hang for the OS's TCP timeout).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The broker refused or dropped the connection (unreachable, wrong credentials, …).
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The broker URL, password redacted.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The handshake did not finish within [`CONNECT_TIMEOUT`].
    #[error("connecting to {url}: no answer within {after:?}")]
    ConnectTimeout {
        /// The broker URL, password redacted.
        url: String,
        /// How long it waited.
        after: Duration,
    },
    /// Opening or setting up a channel failed.
    #[error("{what}: {source}")]
    Channel {
        /// The operation, e.g. `basic.qos`.
        what: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// Declaring or checking the topology failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

impl OpenError {
    /// Whether another attempt cannot help: the topology needs an operator (a mismatch or a
    /// missing queue). Everything else is worth retrying after the backoff.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Topology(e) if e.is_permanent())
    }

    /// `Self::Channel` for `what`, as a `map_err` argument.
    pub(crate) fn channel(what: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Channel { what, source }
    }
}

impl From<OpenError> for QueueError {
    fn from(e: OpenError) -> Self {
        QueueError::Broker(e.to_string())
    }
}

/// What [`Session::open`] does about the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Topology {
    /// [`declare_topology`]: declare it (or check it passively when the settings say so).
    Declare,
    /// Leave it alone (operator tools that only read or use what exists).
    Skip,
}

/// One connection with its publisher-confirm channel. Owners add their own channels with
/// [`channel`](Self::channel).
pub(crate) struct Session {
    /// The connection; closing it requeues every unacknowledged delivery received on it.
    pub(crate) connection: Connection,
    /// A channel in confirm mode, for [`crate::confirm`]. The broker closes it on a channel
    /// error (e.g. 404 for a missing exchange): [`ensure_confirm`](Self::ensure_confirm)
    /// reopens it.
    pub(crate) confirm: Channel,
}

impl Session {
    /// Connects as `<connection_name>/<role>`, handles the topology, opens the confirm channel.
    /// With a URL list ([`AmqpSettings::urls`]) it connects to the first entry that answers,
    /// starting after the one this role last connected to (each entry bounded by
    /// [`CONNECT_TIMEOUT`]); a failure after the connection (topology, channels) is not
    /// retried on the next entry.
    ///
    /// # Errors
    /// [`OpenError`]; [`OpenError::is_permanent`] says whether to retry.
    pub(crate) async fn open(settings: &AmqpSettings, role: &str, topology: Topology) -> Result<Self, OpenError> {
        let name = format!("{}/{role}", settings.connection_name);
        let connection = connect(settings, role, &name).await?;
        if topology == Topology::Declare {
            // A channel of its own: a failed declaration closes its channel.
            let setup = connection.create_channel().await.map_err(OpenError::channel("opening a channel"))?;
            declare_topology(&setup, settings).await?;
            let _ = setup.close(200, "topology declared".into()).await;
        }
        let confirm = confirm_channel(&connection).await?;
        Ok(Self { connection, confirm })
    }

    /// A new channel on the connection.
    ///
    /// # Errors
    /// [`OpenError::Channel`] naming `what`.
    pub(crate) async fn channel(&self, what: &'static str) -> Result<Channel, OpenError> {
        self.connection.create_channel().await.map_err(OpenError::channel(what))
    }

    /// Subscribes to `queue` on a channel of its own: `basic.qos(prefetch)` (per consumer),
    /// then `basic.consume` with manual acks, `args` and a tag naming the connection and `role`.
    ///
    /// # Errors
    /// [`OpenError::Channel`] for the step that failed.
    pub(crate) async fn subscribe(
        &self,
        settings: &AmqpSettings,
        queue: &str,
        prefetch: u16,
        role: &str,
        args: FieldTable,
    ) -> Result<(Channel, Consumer), OpenError> {
        let channel = self.channel("opening a consuming channel").await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(OpenError::channel("basic.qos"))?;
        let tag =
            ShortString::from(format!("{}/{role}-{:08x}", short(&settings.connection_name), rand::random::<u32>()));
        let consumer = channel
            .basic_consume(short(queue), tag, BasicConsumeOptions::default(), args)
            .await
            .map_err(OpenError::channel("basic.consume"))?;
        Ok((channel, consumer))
    }

    /// Whether the connection and the confirm channel are usable.
    pub(crate) fn healthy(&self) -> bool {
        self.connection.status().connected() && self.confirm.status().connected()
    }

    /// Reopens the confirm channel if the broker closed it (the connection being fine).
    ///
    /// # Errors
    /// [`OpenError::Channel`] when a new channel cannot be opened.
    pub(crate) async fn ensure_confirm(&mut self) -> Result<(), OpenError> {
        if !self.confirm.status().connected() {
            self.confirm = confirm_channel(&self.connection).await?;
        }
        Ok(())
    }

    /// Waits for outstanding confirms, then closes the connection.
    pub(crate) async fn close(self, reason: &str) {
        let _ = self.confirm.wait_for_confirms().await;
        let _ = self.connection.close(200, reason.into()).await;
    }
}

/// Calls `open` after each delay of `backoff` until it succeeds (then resets the backoff) or
/// fails for good; transient failures are logged as `what` failing.
///
/// # Errors
/// [`QueueError::Broker`] for a permanent failure ([`OpenError::is_permanent`]).
pub(crate) async fn reopen<T, F, Fut>(backoff: &mut Backoff, what: &str, mut open: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OpenError>>,
{
    loop {
        tokio::time::sleep(backoff.next_delay()).await;
        match open().await {
            Ok(opened) => {
                backoff.reset();
                return Ok(opened);
            }
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => tracing::warn!(error = %e, "{what} reconnect failed"),
        }
    }
}

/// Where the next connection of a (URL list, role) starts in the list: the entry after the one
/// it last connected to, so a reconnect after losing a node tries the next node first. A single
/// URL never needs it.
static NEXT_URL: LazyLock<Mutex<HashMap<(String, String), usize>>> = LazyLock::new(Mutex::default);

/// Connects to the first entry of [`AmqpSettings::urls`] that answers, starting at the rotating
/// index of (`settings.url`, `role`); the error is the last entry's.
async fn connect(settings: &AmqpSettings, role: &str, name: &str) -> Result<Connection, OpenError> {
    let urls = settings.urls();
    if urls.len() <= 1 {
        // One URL (or none, which lapin rejects): exactly the single-broker behaviour.
        let url = urls.first().copied().unwrap_or(settings.url.as_str());
        return connect_one(url, name).await;
    }
    let key = (settings.url.clone(), role.to_owned());
    let start = NEXT_URL.lock().map_or(0, |m| m.get(&key).copied().unwrap_or(0)) % urls.len();
    let mut last = None;
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        match connect_one(urls[i], name).await {
            Ok(connection) => {
                if let Ok(mut m) = NEXT_URL.lock() {
                    m.insert(key, (i + 1) % urls.len());
                }
                if k > 0 {
                    tracing::info!(url = %redact_url(urls[i]), skipped = k, "connected to a later broker of the list");
                }
                return Ok(connection);
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker unavailable; trying the next of the list");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least two URLs were tried"))
}

async fn connect_one(url: &str, name: &str) -> Result<Connection, OpenError> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(OpenError::Connect { url: redact_url(url), source }),
        Err(_) => Err(OpenError::ConnectTimeout { url: redact_url(url), after: CONNECT_TIMEOUT }),
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, OpenError> {
    let channel = connection.create_channel().await.map_err(OpenError::channel("opening the confirm channel"))?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(OpenError::channel("confirm.select"))?;
    Ok(channel)
}
