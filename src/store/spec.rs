//! Backend arguments: a local directory or a bucket URL, as given on the command line.

use std::path::Path;
use std::sync::Arc;

use super::remote::{canonical_location, is_url, RemoteStore};
use super::{LocalStore, Store};

/// What a backend is to be opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `init`: it must exist and be empty.
    Format,
    /// `mount`: it must exist.
    Mount,
}

/// Opens the backend named by `arg`: a bucket URL (`s3://bucket/prefix?options`, see
/// [`super::remote`]) or a local directory. Returns the location recorded for it (canonical
/// path or `scheme://bucket/prefix`) and the store. Errors are one line, ready for the user.
pub fn open_backend(arg: &str, purpose: Purpose) -> Result<(String, Arc<dyn Store>), String> {
    if is_url(arg) {
        let store = RemoteStore::open(arg)?;
        if purpose == Purpose::Format && !store.is_empty()? {
            return Err(format!("backend {} is not empty", store.location()));
        }
        return Ok((store.location().to_string(), Arc::new(store)));
    }
    let path = Path::new(arg);
    if !path.exists() {
        return Err(format!("backend {arg} does not exist"));
    }
    if purpose == Purpose::Format {
        if !path.is_dir() {
            return Err(format!("backend {arg} is not a directory"));
        }
        let mut entries = std::fs::read_dir(path).map_err(|e| format!("backend {arg}: {e}"))?;
        if entries.next().is_some() {
            return Err(format!("backend {arg} is not empty"));
        }
    }
    let store = LocalStore::open(path).map_err(|e| format!("backend {arg}: {e}"))?;
    Ok((store.describe(), Arc::new(store)))
}

/// The location a backend argument names, without opening it: the canonical path of an
/// existing directory, `scheme://bucket/prefix` for a URL, the text itself otherwise (e.g.
/// a member id).
pub fn backend_location(arg: &str) -> String {
    if is_url(arg) {
        return canonical_location(arg).unwrap_or_else(|_| arg.to_string());
    }
    match std::fs::canonicalize(arg) {
        Ok(p) => p.display().to_string(),
        Err(_) => arg.to_string(),
    }
}

/// Splits backend arguments into backends: each may be a colon-separated list (as
/// `mount.fuse3` passes them), where a part that is a URL scheme followed by `//...` is
/// joined back to it, so `s3://b/p:/disk/m` is two backends. Colons inside a URL's query
/// (`?endpoint=http://host:3900`) stay in the URL as well.
pub fn split_backends<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        let parts: Vec<&str> = arg.as_ref().split(':').collect();
        let mut i = 0;
        while i < parts.len() {
            let part = parts[i];
            if i + 1 < parts.len()
                && parts[i + 1].starts_with("//")
                && is_url(&format!("{part}://x"))
            {
                // A URL: `scheme` `//bucket/prefix[?query with colons]`. The URL goes on
                // while the next parts belong to its query or port (they do not start a
                // path or another URL).
                let mut url = format!("{part}:{}", parts[i + 1]);
                i += 2;
                while i < parts.len() && url.contains('?') && !starts_backend(&parts, i) {
                    url.push(':');
                    url.push_str(parts[i]);
                    i += 1;
                }
                out.push(url);
                continue;
            }
            if !part.is_empty() {
                out.push(part.to_string());
            }
            i += 1;
        }
    }
    out
}

/// True when `parts[i]` starts another backend: an absolute path, or a URL scheme
/// followed by `//`. Anything else after a URL with a query continues the query
/// (`//host:3900&region=x` splits into `//host` and `3900&region=x`).
fn starts_backend(parts: &[&str], i: usize) -> bool {
    let part = parts[i];
    if part.starts_with('/') && !part.starts_with("//") {
        return true;
    }
    let scheme_like = !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        && part.starts_with(|c: char| c.is_ascii_alphabetic());
    if scheme_like && parts.get(i + 1).is_some_and(|n| n.starts_with("//")) {
        // `http://...` inside a query is part of an option value (`endpoint=http`
        // would not be scheme-like), so a bare scheme here starts a new URL.
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_lists_keep_urls() {
        assert_eq!(split_backends(&["/a:/b:/c"]), vec!["/a", "/b", "/c"]);
        assert_eq!(
            split_backends(&["/disk1/m:s3://bucket/prefix"]),
            vec!["/disk1/m", "s3://bucket/prefix"]
        );
        assert_eq!(
            split_backends(&["s3://bucket/prefix:/disk1/m"]),
            vec!["s3://bucket/prefix", "/disk1/m"]
        );
        assert_eq!(
            split_backends(&["/d:s3://b/p?endpoint=http://127.0.0.1:3900&region=garage:/e"]),
            vec![
                "/d",
                "s3://b/p?endpoint=http://127.0.0.1:3900&region=garage",
                "/e"
            ]
        );
        assert_eq!(
            split_backends(&["s3://b/p?endpoint=http://h:1:s3://c/q", "/x"]),
            vec!["s3://b/p?endpoint=http://h:1", "s3://c/q", "/x"]
        );
        assert_eq!(split_backends(&["rel/a:rel/b"]), vec!["rel/a", "rel/b"]);
    }
}
