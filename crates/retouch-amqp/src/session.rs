//! [`Session`]: the one way this crate opens the broker — a named connection (bounded by
//! [`CONNECT_TIMEOUT`]), the topology declared or checked on a throwaway channel, and a
//! publisher-confirm channel — and [`OpenError`], which says whether a failed open is worth
//! another attempt. The source, the publisher and the operator tools all open sessions here.
//!
//! lapin 4's automatic recovery is young (fixes through 4.12.3 for recovery after a broker
//! restart), so it stays off: each owner rebuilds its session itself after the backoff of
//! [`AmqpSettings::reconnect_backoff`].

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use retouch_core::queue::QueueError;

use crate::settings::AmqpSettings;
use crate::topology::{TopologyError, declare_topology};

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
    ///
    /// # Errors
    /// [`OpenError`]; [`OpenError::is_permanent`] says whether to retry.
    pub(crate) async fn open(settings: &AmqpSettings, role: &str, topology: Topology) -> Result<Self, OpenError> {
        let name = format!("{}/{role}", settings.connection_name);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&settings.url, props)).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => return Err(OpenError::Connect { url: settings.redacted_url(), source }),
            Err(_) => return Err(OpenError::ConnectTimeout { url: settings.redacted_url(), after: CONNECT_TIMEOUT }),
        };
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

async fn confirm_channel(connection: &Connection) -> Result<Channel, OpenError> {
    let channel = connection.create_channel().await.map_err(OpenError::channel("opening the confirm channel"))?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(OpenError::channel("confirm.select"))?;
    Ok(channel)
}
