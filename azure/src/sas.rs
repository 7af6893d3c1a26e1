//! Blob URLs carrying a SAS token.
//!
//! Accepted forms: `https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?sv=..&sig=..` and the
//! path-style emulator form `http://HOST:PORT/ACCOUNT/CONTAINER/BLOB?sv=..&sig=..` (any host
//! that is an IP address or `localhost`). The query must hold a signature (`sig`): without one
//! every request would be refused, so the URL is refused up front with what to change.

use std::fmt;

use url::Url;

use crate::error::BlobError;

/// A page-blob URL with its SAS token; displays without the query (the token is a secret).
#[derive(Clone)]
pub struct BlobUrl {
    url: Url,
    shown: String,
}

impl BlobUrl {
    /// True if `s` looks like a URL rather than a file name (`http://` or `https://`).
    pub fn looks_like_url(s: &str) -> bool {
        let l = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        l.starts_with("http://") || l.starts_with("https://")
    }

    /// Parses and checks a blob URL.
    pub fn parse(s: &str) -> Result<BlobUrl, BlobError> {
        let bad = |shown: &str, reason: &str| BlobError::BadUrl {
            url: shown.to_string(),
            reason: reason.to_string(),
        };
        let shown_raw = s.split('?').next().unwrap_or(s);
        let url = Url::parse(s).map_err(|e| bad(shown_raw, &e.to_string()))?;
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            match url.port() {
                Some(p) => format!(":{p}{}", url.path()),
                None => url.path().to_string(),
            }
        );
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(bad(&shown, "only http and https blob URLs are supported"));
        }
        let host = url.host_str().unwrap_or("");
        let path_style = url.port().is_some()
            || host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok()
            || host.starts_with('[');
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        let need = if path_style { 3 } else { 2 };
        if segments.len() < need {
            return Err(bad(
                &shown,
                if path_style {
                    "expected http://HOST:PORT/ACCOUNT/CONTAINER/BLOB"
                } else {
                    "expected https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB"
                },
            ));
        }
        if !url.query_pairs().any(|(k, v)| k == "sig" && !v.is_empty()) {
            return Err(bad(
                &shown,
                "no SAS token in the query string (…?sv=…&sig=…): get one with \
                 `az disk grant-access` or `az storage blob generate-sas`",
            ));
        }
        Ok(BlobUrl { url, shown })
    }

    /// The full URL (with the SAS) plus `comp=<comp>` when given.
    pub(crate) fn request_url(&self, comp: Option<&str>) -> String {
        match comp {
            None => self.url.as_str().to_string(),
            Some(c) => {
                let mut u = self.url.clone();
                u.query_pairs_mut().append_pair("comp", c);
                u.into()
            }
        }
    }
}

impl fmt::Display for BlobUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for BlobUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobUrl({})", self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_and_service_urls_parse_and_hide_the_token() {
        let u = BlobUrl::parse("http://127.0.0.1:10000/devstoreaccount1/c/d.vhd?sv=1&sig=SECRET")
            .unwrap();
        assert_eq!(
            u.to_string(),
            "http://127.0.0.1:10000/devstoreaccount1/c/d.vhd"
        );
        assert!(u
            .request_url(Some("page"))
            .ends_with("sig=SECRET&comp=page"));
        let u = BlobUrl::parse("https://a.blob.core.windows.net/c/d.vhd?sv=1&sig=S%2B").unwrap();
        assert_eq!(u.to_string(), "https://a.blob.core.windows.net/c/d.vhd");
        assert!(!format!("{u:?}").contains("sig"));
    }

    #[test]
    fn url_without_sas_or_blob_is_refused_with_a_hint() {
        let e = BlobUrl::parse("https://a.blob.core.windows.net/c/d.vhd").unwrap_err();
        assert!(e.to_string().contains("no SAS token"), "{e}");
        let e = BlobUrl::parse("http://127.0.0.1:1/acct/c?sig=x").unwrap_err();
        assert!(e.to_string().contains("ACCOUNT/CONTAINER/BLOB"), "{e}");
        let e = BlobUrl::parse("ftp://h/a/b/c?sig=x").unwrap_err();
        assert!(e.to_string().contains("http"), "{e}");
        assert!(!BlobUrl::parse("https://a.b/c/d?sig=SECRET")
            .map(|u| u.to_string())
            .unwrap()
            .contains("SECRET"));
    }

    #[test]
    fn urls_are_told_from_file_names() {
        assert!(BlobUrl::looks_like_url("HTTPS://x/y"));
        assert!(BlobUrl::looks_like_url("http://x"));
        assert!(!BlobUrl::looks_like_url("disk.vhd"));
        assert!(!BlobUrl::looks_like_url("http"));
    }
}
