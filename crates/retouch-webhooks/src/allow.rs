//! [`AllowList`]: which webhook URLs may be called at all — the gate between a URL that a
//! job's submitter wrote and a connection from inside the cluster (the guard against
//! server-side request forgery: without it a job could make the worker POST to the metadata
//! service, the broker's management API or anything else the worker can reach).
//!
//! Entries are host names, optionally with a port (`hooks.example.com`,
//! `hooks.example.com:8443`), subdomain wildcards (`*.example.com`: any name below
//! `example.com`, never `example.com` itself), or IP literals (`127.0.0.1:9000`,
//! `[::1]:9000`), which match only that address written as an address — a host name never
//! matches an IP entry and a wildcard never matches an address. An entry without a port allows
//! only the scheme's default port (443 for `https`, 80 for `http`).
//!
//! Names are compared after the URL standard's host parsing (lower case, IDNA to punycode,
//! numeric IPv4 forms such as `2130706433` read as addresses) with a trailing dot removed. The
//! list is about names: what a listed name resolves to is the DNS owner's business, so list
//! only names whose DNS is trusted.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use retouch_core::redact::redact_url;
use url::{Host, Url};

/// The longest URL accepted (bytes). Longer ones are refused rather than sent.
pub const MAX_URL_BYTES: usize = 2048;

/// Why a webhook URL may not be called. Every message names the host when there is one.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum UrlError {
    /// Not a URL at all (or not one the HTTP client can send).
    #[error("webhook URL {url:?} cannot be used: {reason}")]
    Unparsable {
        /// The URL as given (a password in it masked, cut to 200 characters).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Longer than [`MAX_URL_BYTES`].
    #[error("webhook URL for host {host:?} is {len} bytes long, at most {MAX_URL_BYTES} are allowed")]
    TooLong {
        /// The host, if one could be read.
        host: String,
        /// The URL's length in bytes.
        len: usize,
    },
    /// A scheme other than `https` and `http` (`javascript:`, `file:`, `ftp:`…).
    #[error(
        "webhook URL scheme {scheme:?} is not allowed: only https:// (and http:// where webhooks.allow_http is on)"
    )]
    Scheme {
        /// The URL's scheme, lower case.
        scheme: String,
    },
    /// `http://` while `allow_http` is off.
    #[error("webhook URL for host {host:?} is http://: only https:// is allowed (webhooks.allow_http is off)")]
    HttpNotAllowed {
        /// The URL's host.
        host: String,
    },
    /// A user name or password in the URL (`https://user:pass@host/`): credentials belong in
    /// the signature, and `user@` is a classic way to disguise the real host.
    #[error("webhook URL for host {host:?} contains credentials (user:password@): not allowed")]
    Credentials {
        /// The URL's host.
        host: String,
    },
    /// A `#fragment`: never sent over HTTP, so it is almost certainly a mistake.
    #[error("webhook URL for host {host:?} has a #fragment: not allowed")]
    Fragment {
        /// The URL's host.
        host: String,
    },
    /// No host (`https:///path` cannot be produced by the URL parser, but stay safe).
    #[error("webhook URL has no host")]
    NoHost,
    /// The host and port are not on [`WebhookSettings::allow_hosts`].
    ///
    /// [`WebhookSettings::allow_hosts`]: crate::WebhookSettings::allow_hosts
    #[error("webhook host {host}:{port} is not on webhooks.allow_hosts")]
    HostNotAllowed {
        /// The URL's host (IPv6 in brackets).
        host: String,
        /// The port that would be connected to (the scheme's default when the URL has none).
        port: u16,
    },
}

/// What an entry's host part matches.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// Exactly this domain name (lower case, punycode, no trailing dot).
    Domain(String),
    /// Any name ending in this suffix, which starts with a dot (`.example.com`).
    Subdomains(String),
    /// Exactly this IPv4 address.
    Ipv4(Ipv4Addr),
    /// Exactly this IPv6 address.
    Ipv6(Ipv6Addr),
}

/// One parsed `allow_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The host part.
    pattern: Pattern,
    /// The one port allowed, or `None` for the scheme's default port.
    port: Option<u16>,
}

impl Entry {
    /// Parses `host`, `host:port`, `*.domain[:port]`, `a.b.c.d[:port]` or `[v6][:port]`.
    fn parse(entry: &str) -> Result<Entry, String> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err("empty entry".into());
        }
        if entry.contains("://") || entry.contains(['/', '@', '?', '#']) {
            return Err("expected host or host:port, not a URL".into());
        }
        let (host, port) = split_port(entry)?;
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => Some(p),
                _ => return Err(format!("port {p:?} is not a number in 1–65535")),
            },
        };
        let pattern = if let Some(suffix) = host.strip_prefix("*.") {
            match parse_host(suffix)? {
                Pattern::Domain(domain) => Pattern::Subdomains(format!(".{domain}")),
                _ => return Err("a wildcard needs a domain name after \"*.\", not an address".into()),
            }
        } else if host.contains('*') {
            return Err("a wildcard is only allowed as a leading \"*.\"".into());
        } else {
            parse_host(host)?
        };
        Ok(Entry { pattern, port })
    }

    /// Whether `host` (normalised) on `port` matches, `default_port` being the scheme's.
    fn matches(&self, host: &Host<String>, port: u16, default_port: u16) -> bool {
        let host_matches = match (&self.pattern, host) {
            (Pattern::Domain(want), Host::Domain(have)) => want == have,
            (Pattern::Subdomains(suffix), Host::Domain(have)) => have.len() > suffix.len() && have.ends_with(suffix),
            (Pattern::Ipv4(want), Host::Ipv4(have)) => want == have,
            (Pattern::Ipv6(want), Host::Ipv6(have)) => want == have,
            _ => false,
        };
        host_matches && port == self.port.unwrap_or(default_port)
    }
}

/// Splits `host[:port]`, where an IPv6 host is bracketed.
fn split_port(entry: &str) -> Result<(&str, Option<&str>), String> {
    if entry.starts_with('[') {
        let Some(end) = entry.find(']') else {
            return Err("unclosed '[' in an IPv6 address".into());
        };
        let (host, rest) = entry.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("unexpected {rest:?} after the IPv6 address")),
            },
        };
    }
    match entry.split_once(':') {
        None => Ok((entry, None)),
        Some((_, port)) if port.contains(':') => Err("an IPv6 address must be written in brackets: [::1]:9000".into()),
        Some((host, port)) => Ok((host, Some(port))),
    }
}

/// Parses a host as a URL's host is parsed (lower case, IDNA, IPv4 forms), trailing dot removed.
fn parse_host(host: &str) -> Result<Pattern, String> {
    match Host::parse(host).map_err(|e| format!("invalid host: {e}"))? {
        Host::Domain(domain) => {
            let domain = domain.strip_suffix('.').unwrap_or(&domain);
            if domain.is_empty() || domain.starts_with('.') || domain.contains("..") {
                return Err("invalid host: empty label".into());
            }
            Ok(Pattern::Domain(domain.to_owned()))
        }
        Host::Ipv4(addr) => Ok(Pattern::Ipv4(addr)),
        Host::Ipv6(addr) => Ok(Pattern::Ipv6(addr)),
    }
}

/// The parsed `webhooks.allow_hosts`: which hosts and ports a webhook may be sent to. Empty
/// (the default) allows nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// The valid entries, in configuration order.
    entries: Vec<Entry>,
}

impl AllowList {
    /// The list from `allow_hosts` entries. Invalid entries are left out (they allow nothing);
    /// [`AllowList::parse`], which [`WebhookSettings::validate`] runs, reports them.
    ///
    /// [`WebhookSettings::validate`]: crate::WebhookSettings::validate
    pub fn new(entries: &[String]) -> AllowList {
        AllowList { entries: entries.iter().filter_map(|e| Entry::parse(e).ok()).collect() }
    }

    /// The list from `allow_hosts` entries, refusing invalid ones.
    ///
    /// # Errors
    /// A message naming the first invalid entry (by index and value) and why.
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, e)| Entry::parse(e).map_err(|why| format!("allow_hosts[{i}] {e:?}: {why}")))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { entries })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses and checks a webhook URL: `https` (or `http` when `allow_http`), no user
    /// name or password, no fragment, at most [`MAX_URL_BYTES`], and a host and port on the
    /// list. Returns the URL to call, its host normalised (lower case, punycode, no trailing
    /// dot).
    ///
    /// # Errors
    /// [`UrlError`] saying exactly why, naming the host when the URL has one.
    pub fn check(&self, url: &str, allow_http: bool) -> Result<Url, UrlError> {
        let mut parsed = Url::parse(url.trim()).map_err(|e| UrlError::Unparsable {
            url: redact_url(url).chars().take(200).collect(),
            reason: e.to_string(),
        })?;
        let default_port = match parsed.scheme() {
            "https" => 443,
            "http" if allow_http => 80,
            "http" => return Err(UrlError::HttpNotAllowed { host: host_text(&parsed) }),
            other => return Err(UrlError::Scheme { scheme: other.to_owned() }),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlError::Credentials { host: host_text(&parsed) });
        }
        if parsed.fragment().is_some() {
            return Err(UrlError::Fragment { host: host_text(&parsed) });
        }
        if url.len() > MAX_URL_BYTES {
            return Err(UrlError::TooLong { host: host_text(&parsed), len: url.len() });
        }
        let host = match parsed.host() {
            None => return Err(UrlError::NoHost),
            Some(Host::Domain(domain)) => {
                let domain = domain.strip_suffix('.').unwrap_or(domain);
                if domain.is_empty() {
                    return Err(UrlError::NoHost);
                }
                Host::Domain(domain.to_owned())
            }
            Some(Host::Ipv4(addr)) => Host::Ipv4(addr),
            Some(Host::Ipv6(addr)) => Host::Ipv6(addr),
        };
        let port = parsed.port_or_known_default().unwrap_or(default_port);
        if !self.entries.iter().any(|entry| entry.matches(&host, port, default_port)) {
            return Err(UrlError::HostNotAllowed { host: host.to_string(), port });
        }
        if let Host::Domain(domain) = &host
            && parsed.host_str() != Some(domain.as_str())
        {
            // Only the trailing dot differs: call the name certificates are issued for.
            parsed.set_host(Some(domain)).map_err(|e| UrlError::Unparsable {
                url: redact_url(url).chars().take(200).collect(),
                reason: e.to_string(),
            })?;
        }
        // The HTTP client's URI parser is stricter than the URL standard in corners; refuse
        // here what it would refuse on every attempt.
        if let Err(e) = parsed.as_str().parse::<hyper::Uri>() {
            return Err(UrlError::Unparsable {
                url: redact_url(url).chars().take(200).collect(),
                reason: format!("not accepted by the HTTP client: {e}"),
            });
        }
        Ok(parsed)
    }
}

/// The host of a parsed URL for an error message (empty when there is none).
fn host_text(url: &Url) -> String {
    url.host().map(|h| h.to_string()).unwrap_or_default()
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.entries.iter().map(|entry| {
            let host = match &entry.pattern {
                Pattern::Domain(d) => d.clone(),
                Pattern::Subdomains(suffix) => format!("*{suffix}"),
                Pattern::Ipv4(a) => a.to_string(),
                Pattern::Ipv6(a) => format!("[{a}]"),
            };
            match entry.port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        });
        f.debug_list().entries(entries).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        AllowList::parse(&entries).expect("valid entries")
    }

    fn not_allowed(host: &str, port: u16) -> Result<Url, UrlError> {
        Err(UrlError::HostNotAllowed { host: host.into(), port })
    }

    #[test]
    fn exact_host_on_its_default_port_only() {
        let l = list(&["hooks.example.com"]);
        let url = l.check("https://hooks.example.com/retouch?job=1", false).expect("allowed");
        assert_eq!(url.as_str(), "https://hooks.example.com/retouch?job=1");
        assert!(l.check("https://hooks.example.com:443/x", false).is_ok(), "explicit default port");
        assert_eq!(l.check("https://hooks.example.com:8443/x", false), not_allowed("hooks.example.com", 8443));
        assert_eq!(l.check("https://other.example.com/x", false), not_allowed("other.example.com", 443));
        assert_eq!(l.check("https://a.hooks.example.com/x", false), not_allowed("a.hooks.example.com", 443));
        assert_eq!(
            l.check("https://hooks.example.com.evil.net/", false),
            not_allowed("hooks.example.com.evil.net", 443)
        );
        assert!(l.check("http://hooks.example.com/x", true).is_ok(), "http's default port 80");
        assert_eq!(l.check("http://hooks.example.com:443/x", true), not_allowed("hooks.example.com", 443));
    }

    #[test]
    fn an_entry_with_a_port_allows_only_that_port() {
        let l = list(&["hooks.example.com:8443"]);
        assert!(l.check("https://hooks.example.com:8443/x", false).is_ok());
        assert_eq!(l.check("https://hooks.example.com/x", false), not_allowed("hooks.example.com", 443));
        assert_eq!(l.check("https://hooks.example.com:8444/x", false), not_allowed("hooks.example.com", 8444));
    }

    #[test]
    fn wildcards_match_subdomains_not_the_apex_nor_addresses() {
        let l = list(&["*.example.com"]);
        assert!(l.check("https://hooks.example.com/x", false).is_ok());
        assert!(l.check("https://a.b.example.com/x", false).is_ok(), "any depth");
        assert_eq!(l.check("https://example.com/x", false), not_allowed("example.com", 443));
        assert_eq!(l.check("https://badexample.com/x", false), not_allowed("badexample.com", 443));
        assert_eq!(l.check("https://hooks.example.com:8443/x", false), not_allowed("hooks.example.com", 8443));
        assert!(list(&["*.example.com:8443"]).check("https://x.example.com:8443/", false).is_ok());
    }

    #[test]
    fn ip_literals_only_when_listed_exactly() {
        let l = list(&["127.0.0.1:9000", "[::1]:9000", "localhost:9000"]);
        assert!(l.check("http://127.0.0.1:9000/hook", true).is_ok());
        assert!(l.check("http://[::1]:9000/hook", true).is_ok());
        assert_eq!(l.check("http://127.0.0.1:9001/hook", true), not_allowed("127.0.0.1", 9001));
        assert_eq!(l.check("http://127.0.0.2:9000/hook", true), not_allowed("127.0.0.2", 9000));
        assert_eq!(
            l.check("http://2130706433:9000/", true).map(|u| u.to_string()),
            Ok("http://127.0.0.1:9000/".into())
        );
        let names = list(&["localhost", "*.example.com"]);
        assert_eq!(
            names.check("https://127.0.0.1/", false),
            not_allowed("127.0.0.1", 443),
            "a name never matches an address"
        );
        assert_eq!(names.check("https://[::1]/", false), not_allowed("[::1]", 443));
    }

    #[test]
    fn hosts_are_normalised() {
        let l = list(&["Hooks.Example.COM."]);
        let url = l.check("https://HOOKS.example.Com./x", false).expect("case and trailing dot ignored");
        assert_eq!(url.as_str(), "https://hooks.example.com/x", "the trailing dot is dropped from the URL called");
        assert!(list(&["*.Example.com"]).check("https://A.EXAMPLE.com./", false).is_ok());
        let idn = list(&["bücher.example"]);
        assert!(idn.check("https://xn--bcher-kva.example/", false).is_ok(), "IDNA on both sides");
    }

    #[test]
    fn refuses_credentials_fragments_and_other_schemes() {
        let l = list(&["hooks.example.com", "127.0.0.1:9000"]);
        assert_eq!(
            l.check("https://user:pw@hooks.example.com/", false),
            Err(UrlError::Credentials { host: "hooks.example.com".into() })
        );
        assert_eq!(
            l.check("https://hooks.example.com@evil.net/", false),
            Err(UrlError::Credentials { host: "evil.net".into() }),
            "userinfo that disguises the host"
        );
        assert_eq!(
            l.check("https://hooks.example.com/#x", false),
            Err(UrlError::Fragment { host: "hooks.example.com".into() })
        );
        assert_eq!(l.check("javascript:alert(1)", true), Err(UrlError::Scheme { scheme: "javascript".into() }));
        assert_eq!(l.check("file:///etc/passwd", true), Err(UrlError::Scheme { scheme: "file".into() }));
        assert_eq!(l.check("ftp://hooks.example.com/", true), Err(UrlError::Scheme { scheme: "ftp".into() }));
        assert_eq!(
            l.check("http://127.0.0.1:9000/", false),
            Err(UrlError::HttpNotAllowed { host: "127.0.0.1".into() }),
            "http needs allow_http"
        );
        let e = l.check("not a url", false).expect_err("unparsable");
        assert!(matches!(&e, UrlError::Unparsable { url, .. } if url == "not a url"), "{e:?}");
        let e = l.check("https://u:s3cret@[bad/", false).expect_err("unparsable");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(matches!(l.check(&long, false), Err(UrlError::TooLong { .. })));
    }

    #[test]
    fn messages_name_the_host() {
        let l = list(&["hooks.example.com"]);
        let e = l.check("https://evil.net:8443/x", false).expect_err("not listed");
        assert_eq!(e.to_string(), "webhook host evil.net:8443 is not on webhooks.allow_hosts");
        assert!(l.check("http://evil.net/", false).expect_err("http").to_string().contains("\"evil.net\""));
    }

    #[test]
    fn an_empty_list_allows_nothing() {
        let l = AllowList::new(&[]);
        assert!(l.is_empty());
        assert_eq!(l.check("https://hooks.example.com/", false), not_allowed("hooks.example.com", 443));
    }

    #[test]
    fn invalid_entries_are_reported_and_allow_nothing() {
        for (entry, needle) in [
            ("", "empty"),
            ("https://hooks.example.com", "not a URL"),
            ("hooks.example.com/path", "not a URL"),
            ("hooks.example.com:0", "port"),
            ("hooks.example.com:https", "port"),
            ("*", "wildcard"),
            ("*.", "invalid host"),
            ("a.*.example.com", "wildcard"),
            ("*.127.0.0.1", "address"),
            ("::1", "brackets"),
            ("[::1", "unclosed"),
            ("a..b", "empty label"),
        ] {
            let e = AllowList::parse(&[entry.to_owned()]).expect_err(entry);
            assert!(e.starts_with("allow_hosts[0]") && e.contains(needle), "{entry:?}: {e}");
        }
        let mixed = AllowList::new(&["*".to_owned(), "hooks.example.com".to_owned()]);
        assert!(mixed.check("https://hooks.example.com/", false).is_ok());
        assert_eq!(mixed.check("https://evil.net/", false), not_allowed("evil.net", 443));
        assert_eq!(format!("{mixed:?}"), r#"["hooks.example.com"]"#);
    }
}
