//! Keeping secrets out of logs: URLs with credentials are shown with the password masked.

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`; anything without a password
/// is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // The last '@' ends the userinfo (an unescaped '@' in a password is tolerated).
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!("{}{}:***{}", &url[..scheme_end], &userinfo[..colon], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn only_the_password_is_masked() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("amqp://user@host/%2f"), "amqp://user@host/%2f");
        // An unescaped '@' in the password must not leak its tail.
        assert_eq!(redact_url("amqp://u:p@w@host"), "amqp://u:***@host");
        assert_eq!(redact_url("amqps://w:s3cr:et@mq:5671/prod?x=a@b"), "amqps://w:***@mq:5671/prod?x=a@b");
    }
}
