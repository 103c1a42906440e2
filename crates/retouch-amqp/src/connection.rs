//! Opening connections and pacing reconnects, shared by the source and the publisher.
//!
//! lapin 4's automatic recovery is young (fixes through 4.12.3 for recovery after a broker
//! restart), so it stays off: each owner rebuilds its connection itself — connect, declare,
//! subscribe — after a capped, jittered exponential backoff.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use rand::Rng;

use crate::settings::AmqpSettings;

/// How long one TCP + AMQP handshake may take before the attempt counts as failed (a
/// black-holed host would otherwise hang for the OS's TCP timeout).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a connection named `<connection_name>/<role>`.
pub(crate) async fn open(settings: &AmqpSettings, role: &str) -> Result<Connection, String> {
    let name = format!("{}/{role}", settings.connection_name);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&settings.url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connecting to {}: {e}", settings.redacted_url())),
        Err(_) => Err(format!("connecting to {}: no answer within {CONNECT_TIMEOUT:?}", settings.redacted_url())),
    }
}

/// Capped exponential backoff with jitter: `min · 2ⁿ` capped at `max`, then scaled by a
/// random factor in [0.5, 1] so a fleet that lost the same broker does not return in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(settings: &AmqpSettings) -> Self {
        Self { min: settings.reconnect_backoff_min, max: settings.reconnect_backoff_max, failures: 0 }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.min.saturating_mul(1u32 << self.failures.min(20)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Back to `min` after a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let settings = AmqpSettings {
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(30),
            ..Default::default()
        };
        let mut b = Backoff::new(&settings);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(250) && delays[0] <= Duration::from_millis(500));
        assert!(delays[3] >= Duration::from_secs(2) && delays[3] <= Duration::from_secs(4));
        assert!(delays[11] >= Duration::from_secs(15) && delays[11] <= Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}
