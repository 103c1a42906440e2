//! Prefixes: `s3://bucket/prefix/` locations and the one ListObjectsV2 walk over them, shared
//! by [`S3Store::list_prefix`](crate::S3Store::list_prefix) (campaigns from a prefix) and
//! [`S3Store::sync_prefix`](crate::S3Store::sync_prefix) (model mirrors).

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::DateTime;
use retouch_core::job::ObjectUrl;

use crate::error::{S3Error, classify};

/// One object of a listing.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ListedObject {
    /// The full key (prefix included).
    pub(crate) key: String,
    /// Size in bytes (0 when the store does not say).
    pub(crate) size: u64,
    /// The ETag as listed (quotes included), when the store lists one.
    pub(crate) etag: Option<String>,
    /// `LastModified`, when the store lists it.
    pub(crate) last_modified: Option<DateTime>,
}

/// Every object under `prefix` in `bucket`, in key order, across all pages; "directory"
/// markers made by consoles (keys ending in `/`) are skipped.
///
/// # Errors
/// [`S3Error::Store`] with the classified failure of a page.
pub(crate) async fn list_objects(client: &Client, bucket: &str, prefix: &str) -> Result<Vec<ListedObject>, S3Error> {
    let what = format!("ListObjectsV2 s3://{bucket}/{prefix}");
    let mut request = client.list_objects_v2().bucket(bucket);
    if !prefix.is_empty() {
        request = request.prefix(prefix);
    }
    let mut pages = request.into_paginator().send();
    let mut objects = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify(&what, &e))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            if key.ends_with('/') {
                continue;
            }
            objects.push(ListedObject {
                key: key.to_owned(),
                size: object.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                etag: object.e_tag().map(str::to_owned),
                last_modified: object.last_modified().copied(),
            });
        }
    }
    Ok(objects)
}

/// The path components of `path` if it can be mirrored safely: no empty, `.` or `..`
/// component, no NUL.
pub(crate) fn safe_components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    let ok = parts.iter().all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\0'));
    ok.then_some(parts)
}

/// Splits `s3://bucket/prefix` into the bucket and the prefix, normalised to end with `/`
/// (or empty for the whole bucket).
///
/// # Errors
/// [`S3Error::Invalid`] for another scheme, an invalid bucket name, or a prefix that could not
/// be a relative local path (`..`, `//`).
pub(crate) fn parse_prefix(url_prefix: &str) -> Result<(String, String), S3Error> {
    let rest = url_prefix
        .strip_prefix("s3://")
        .ok_or_else(|| S3Error::Invalid(format!("{url_prefix:?}: expected s3://bucket/prefix/")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    ObjectUrl::parse(&format!("s3://{bucket}/x"))
        .map_err(|_| S3Error::Invalid(format!("{url_prefix:?}: invalid bucket name {bucket:?}")))?;
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok((bucket.to_owned(), String::new()));
    }
    if safe_components(prefix).is_none() {
        return Err(S3Error::Invalid(format!("{url_prefix:?}: the prefix cannot be mirrored to a local path")));
    }
    Ok((bucket.to_owned(), format!("{prefix}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised() {
        let parse = |s: &str| parse_prefix(s).map_err(|e| e.to_string());
        assert_eq!(parse("s3://models/ip2p/v1"), Ok(("models".into(), "ip2p/v1/".into())));
        assert_eq!(parse("s3://models/ip2p/v1/"), Ok(("models".into(), "ip2p/v1/".into())));
        assert_eq!(parse("s3://models"), Ok(("models".into(), String::new())));
        assert_eq!(parse("s3://models/"), Ok(("models".into(), String::new())));
        assert!(parse("file:///models").is_err());
        assert!(parse("s3://Models/x").is_err());
        assert!(parse("s3://models/../etc").is_err());
        assert!(parse("s3://models/a//b").is_err());
    }

    #[test]
    fn only_plain_relative_paths_are_safe() {
        assert_eq!(safe_components("unet/model.safetensors"), Some(vec!["unet", "model.safetensors"]));
        assert_eq!(safe_components(".hidden"), Some(vec![".hidden"]));
        for bad in ["../x", "a/../b", "a//b", "/abs", "./x", "a/", ""] {
            assert_eq!(safe_components(bad), None, "{bad}");
        }
    }
}
