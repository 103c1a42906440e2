//! [`WebhookSettings`]: the `[webhooks]` section of the worker's configuration — which hosts
//! may receive webhooks, the signing secret, and the timing of attempts and retries. Plain
//! data with every default here; it deserializes straight from the configuration file.

use std::fmt;
use std::time::Duration;

use retouch_core::backoff::Backoff;
use serde::{Deserialize, Serialize};

use crate::allow::AllowList;
use crate::signature::Signer;

/// Most deliveries one worker may have in progress at once.
pub const MAX_CONCURRENCY: usize = 256;

/// How webhooks are sent. Webhooks are off until [`secret`](Self::secret) is set, and no URL
/// is called until its host is on [`allow_hosts`](Self::allow_hosts). `Debug` shows the
/// secret as `***`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// The hosts webhooks may be sent to; a URL whose host and port are not listed is refused
    /// without a connection. Entries: `hooks.example.com` (that name on the scheme's default
    /// port, 443 for https), `hooks.example.com:8443` (that port only), `*.example.com` (any
    /// name below `example.com`, not `example.com` itself), `127.0.0.1:9000` or `[::1]:9000`
    /// (an address, matched only when the URL has exactly that address). Names are compared
    /// case-insensitively, IDNA-normalised, ignoring a trailing dot. Default empty: nothing
    /// may be called.
    pub allow_hosts: Vec<String>,
    /// The signing secret, `whsec_<base64 key>` (bare base64 is accepted too), at least 24
    /// bytes of key: generate one with `echo whsec_$(openssl rand -base64 32)` and give the
    /// same value to the receivers. Empty (the default) turns webhooks off: jobs asking for
    /// one are refused. A secret: `Debug` and [`redacted`](Self::redacted) hide it; set it
    /// from the environment or a mounted secret rather than a file in the image.
    pub secret: String,
    /// The limit on one attempt: connecting, TLS, sending and the response's status line and
    /// headers (and reading up to 64 KiB of its body, which is discarded). Receivers should
    /// answer fast and work later. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long to keep retrying after the first attempt of a delivery (a redelivered message
    /// continues the same window); when it has passed, the delivery gives up. 0 means one
    /// attempt only. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// The delay before the first retry; doubled after each failed attempt up to
    /// [`retry_backoff_max`](Self::retry_backoff_max), each scaled by a random factor in
    /// [0.8, 1.2] so that retries after a receiver's outage do not arrive in step. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of the retry delay (before the ±20 % jitter). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Allow `http://` URLs (still only to listed hosts). Off by default: only `https://`.
    /// For tests and for receivers inside the cluster network.
    pub allow_http: bool,
    /// Deliveries one worker has in progress at once (the caller bounds itself with this);
    /// also the idle connections kept per host. A slow receiver holds a slot for up to
    /// [`timeout`](Self::timeout) per attempt. 1–256, default 8.
    pub concurrency: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_hosts: Vec::new(),
            secret: String::new(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(3600),
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            allow_http: false,
            concurrency: 8,
        }
    }
}

impl WebhookSettings {
    /// Checks every key: the allow-list entries parse, a non-empty secret is usable, the
    /// durations and the concurrency are in range.
    ///
    /// # Errors
    /// A message naming the offending key (never showing the secret).
    pub fn validate(&self) -> Result<(), String> {
        AllowList::parse(&self.allow_hosts)?;
        if !self.secret.is_empty() {
            Signer::new(&self.secret).map_err(|e| format!("secret: {e}"))?;
        }
        if self.timeout.is_zero() {
            return Err("timeout: must be > 0".into());
        }
        if self.retry_backoff.is_zero() || self.retry_backoff_max < self.retry_backoff {
            return Err("retry_backoff must be > 0 and <= retry_backoff_max".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!("concurrency {}: must be 1–{MAX_CONCURRENCY}", self.concurrency));
        }
        Ok(())
    }

    /// Whether webhooks are on: a secret is set.
    pub fn enabled(&self) -> bool {
        !self.secret.is_empty()
    }

    /// The parsed [`allow_hosts`](Self::allow_hosts) (invalid entries, which
    /// [`validate`](Self::validate) reports, allow nothing).
    pub fn allow_list(&self) -> AllowList {
        AllowList::new(&self.allow_hosts)
    }

    /// The retry delays: from [`retry_backoff`](Self::retry_backoff), doubling per failed
    /// attempt up to [`retry_backoff_max`](Self::retry_backoff_max), each scaled by a random
    /// factor in [0.8, 1.2].
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.retry_backoff, self.retry_backoff_max).with_jitter(0.8, 1.2)
    }

    /// A copy with the secret replaced by `***` (when one is set), for printing the effective
    /// configuration.
    #[must_use]
    pub fn redacted(&self) -> WebhookSettings {
        WebhookSettings { secret: redact(&self.secret).to_owned(), ..self.clone() }
    }
}

/// `***` for a set secret, empty for none (so "off" stays visible).
fn redact(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "***" }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("allow_hosts", &self.allow_hosts)
            .field("secret", &redact(&self.secret))
            .field("timeout", &self.timeout)
            .field("retry_for", &self.retry_for)
            .field("retry_backoff", &self.retry_backoff)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .field("allow_http", &self.allow_http)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn defaults_are_off_and_valid() {
        let s = WebhookSettings::default();
        assert!(s.validate().is_ok());
        assert!(!s.enabled());
        assert!(s.allow_list().is_empty());
        assert!(WebhookSettings { secret: SECRET.into(), ..Default::default() }.enabled());
    }

    #[test]
    fn debug_and_redacted_hide_the_secret() {
        let s = WebhookSettings { secret: SECRET.into(), ..Default::default() };
        let d = format!("{s:?}");
        assert!(!d.contains("MfKQ") && d.contains("secret: \"***\""), "{d}");
        assert_eq!(s.redacted().secret, "***");
        assert_eq!(WebhookSettings::default().redacted().secret, "");
    }

    #[test]
    fn reads_the_toml_section() {
        let s: WebhookSettings = toml::from_str(
            r#"
            allow_hosts = ["hooks.example.com", "*.example.org:8443"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            timeout = "5s"
            retry_for = "30m"
            retry_backoff = "500ms"
            retry_backoff_max = "1m"
            allow_http = true
            concurrency = 16
            "#,
        )
        .expect("valid section");
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.retry_for, Duration::from_secs(1800));
        assert_eq!(s.retry_backoff, Duration::from_millis(500));
        assert_eq!(s.concurrency, 16);
        assert!(s.validate().is_ok());
        let partial: WebhookSettings = toml::from_str("secret = \"\"").expect("defaults fill in");
        assert_eq!(partial, WebhookSettings::default());
        let unknown = toml::from_str::<WebhookSettings>("secrets = \"x\"").expect_err("unknown key");
        assert!(unknown.to_string().contains("secrets"), "{unknown}");
        let back: WebhookSettings = toml::from_str(&toml::to_string(&s).expect("serializes")).expect("round trip");
        assert_eq!(back, s);
    }

    #[test]
    fn validation_names_the_key() {
        for (s, needle) in [
            (
                WebhookSettings { allow_hosts: vec!["ok.example".into(), "a/b".into()], ..Default::default() },
                "allow_hosts[1]",
            ),
            (WebhookSettings { secret: "whsec_short".into(), ..Default::default() }, "secret"),
            (WebhookSettings { secret: "whsec_!!!!".into(), ..Default::default() }, "secret"),
            (WebhookSettings { timeout: Duration::ZERO, ..Default::default() }, "timeout"),
            (WebhookSettings { retry_backoff: Duration::ZERO, ..Default::default() }, "retry_backoff"),
            (
                WebhookSettings { retry_backoff_max: Duration::from_millis(1), ..Default::default() },
                "retry_backoff_max",
            ),
            (WebhookSettings { concurrency: 0, ..Default::default() }, "concurrency"),
            (WebhookSettings { concurrency: 257, ..Default::default() }, "concurrency"),
        ] {
            let e = s.validate().expect_err(needle);
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let e = WebhookSettings { secret: "whsec_!!!!secretvalue".into(), ..Default::default() }
            .validate()
            .expect_err("bad secret");
        assert!(!e.contains("secretvalue"), "{e}");
    }

    #[test]
    fn backoff_doubles_with_twenty_percent_jitter() {
        let s = WebhookSettings::default();
        let b = s.backoff();
        assert_eq!(b.base(0), Duration::from_secs(1));
        assert_eq!(b.base(3), Duration::from_secs(8));
        assert_eq!(b.base(20), Duration::from_secs(300));
        assert_eq!(b.delay_at(0, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay_at(0, 1.0), Duration::from_millis(1200));
    }
}
