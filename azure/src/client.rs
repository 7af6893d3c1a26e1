//! The page-blob REST calls, each retried by one policy.
//!
//! Requests carry `x-ms-version` and `x-ms-date`; the SAS in the URL authorises them (no
//! shared-key signing here). Every request with a body carries its Content-MD5; ranged reads
//! of at most 4 MiB ask the service for the range's MD5 and check it.

use std::io::Read;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use md5::{Digest, Md5};

use crate::error::BlobError;
use crate::ranges::{self, PageRanges};
use crate::sas::BlobUrl;

/// Page size of page blobs: every write and range is a whole number of pages.
pub const PAGE: u64 = 512;
/// Largest Put Page the service accepts (4 MiB).
pub const MAX_PAGE_WRITE: usize = 4 << 20;
/// The REST API version spoken (supported by Azure and by Azurite 3.x).
const VERSION: &str = "2021-08-06";
/// Largest Get Page Ranges answer read (bytes of XML).
const MAX_PAGE_LIST_XML: u64 = 64 << 20;
/// Largest error body read for its message.
const MAX_ERROR_BODY: u64 = 16 << 10;
/// Largest ranged read that gets an MD5 from the service (its limit).
const MAX_MD5_READ: usize = 4 << 20;

/// How failed requests are repeated.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second try; doubled each time.
    pub first_delay: Duration,
    /// Longest wait between tries (also caps a server's Retry-After).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
        }
    }
}

/// What Get Blob Properties reports.
#[derive(Debug, Clone)]
pub struct Properties {
    /// Blob length in bytes.
    pub length: u64,
    /// `PageBlob`, `BlockBlob` or `AppendBlob`.
    pub blob_type: String,
    /// User metadata (`x-ms-meta-NAME`), names lower-cased.
    pub metadata: Vec<(String, String)>,
}

impl Properties {
    /// The metadata value of `name`.
    pub fn meta(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One page blob, reached through its SAS URL. Cheap to share between threads (`&PageBlob`).
pub struct PageBlob {
    url: BlobUrl,
    agent: ureq::Agent,
    retry: RetryPolicy,
}

/// The outcome of one try.
enum Try {
    /// Worth repeating (with the server's Retry-After, if any).
    Again(BlobError, Option<Duration>),
    /// Final.
    Fail(BlobError),
}

fn md5_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(data))
}

impl PageBlob {
    /// A client for `url` with the default timeouts (connect 15 s, each read or write 60 s)
    /// and retry policy.
    pub fn new(url: BlobUrl) -> PageBlob {
        PageBlob::with_timeouts(url, Duration::from_secs(15), Duration::from_secs(60))
    }

    /// A client with the given connect and I/O timeouts.
    pub fn with_timeouts(url: BlobUrl, connect: Duration, io: Duration) -> PageBlob {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout_read(io)
            .timeout_write(io)
            .max_idle_connections_per_host(64)
            .build();
        PageBlob {
            url,
            agent,
            retry: RetryPolicy::default(),
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> PageBlob {
        self.retry = retry;
        self
    }

    /// The blob's URL.
    pub fn url(&self) -> &BlobUrl {
        &self.url
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        self.agent
            .request(method, url)
            .set("x-ms-version", VERSION)
            .set("x-ms-date", &httpdate::fmt_http_date(SystemTime::now()))
    }

    fn status_error(&self, op: &str, status: u16, resp: ureq::Response) -> BlobError {
        let code = resp.header("x-ms-error-code").unwrap_or("").to_string();
        let mut body = String::new();
        let _ = resp
            .into_reader()
            .take(MAX_ERROR_BODY)
            .read_to_string(&mut body);
        let message = match (body.find("<Message>"), body.find("</Message>")) {
            (Some(s), Some(e)) if s + 9 <= e => body[s + 9..e].to_string(),
            _ => String::new(),
        };
        // The service's message ends in request ids and times: the first line says it all.
        let message = message.lines().next().unwrap_or("").trim().to_string();
        BlobError::Status {
            blob: self.url.to_string(),
            op: op.to_string(),
            status,
            code,
            message,
        }
    }

    /// Sends one request and sorts its failure into retryable or not.
    fn send(
        &self,
        op: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, Try> {
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => {
                let retry_after = resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let e = self.status_error(op, status, resp);
                if matches!(status, 408 | 429 | 500 | 502 | 503 | 504) {
                    Err(Try::Again(e, retry_after))
                } else {
                    Err(Try::Fail(e))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                // Not t.to_string(): it carries the URL, and so the SAS signature.
                let mut message = t.kind().to_string();
                if let Some(m) = t.message() {
                    message = format!("{message}: {m}");
                }
                if let Some(src) = std::error::Error::source(&t) {
                    message = format!("{message}: {src}");
                }
                Err(Try::Again(self.transport(op, message), None))
            }
        }
    }

    fn transport(&self, op: &str, message: String) -> BlobError {
        BlobError::Transport {
            blob: self.url.to_string(),
            op: op.to_string(),
            message,
        }
    }

    fn bad(&self, op: &str, what: impl Into<String>) -> BlobError {
        BlobError::BadResponse {
            blob: self.url.to_string(),
            op: op.to_string(),
            what: what.into(),
        }
    }

    /// Runs `f` until it succeeds, fails for good, or the tries are used up.
    fn retry<T>(&self, mut f: impl FnMut() -> Result<T, Try>) -> Result<T, BlobError> {
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Try::Fail(e)) => return Err(e),
                Err(Try::Again(e, after)) => {
                    if attempt >= self.retry.attempts {
                        return Err(e);
                    }
                    let wait = after.unwrap_or(delay).min(self.retry.max_delay);
                    tracing::warn!(
                        "{e}; try {} of {} in {wait:?}",
                        attempt + 1,
                        self.retry.attempts
                    );
                    std::thread::sleep(wait);
                    delay = (delay * 2).min(self.retry.max_delay);
                    attempt += 1;
                }
            }
        }
    }

    /// Get Blob Properties; `None` if the blob does not exist (a missing container is an error).
    pub fn properties(&self) -> Result<Option<Properties>, BlobError> {
        let op = "Get Blob Properties";
        let url = self.url.request_url(None);
        let r = self.retry(|| match self.send(op, self.request("HEAD", &url).call()) {
            Ok(resp) => Ok(Some(resp)),
            Err(Try::Fail(BlobError::Status {
                status: 404, code, ..
            })) if code == "BlobNotFound" => Ok(None),
            Err(t) => Err(t),
        })?;
        let Some(resp) = r else { return Ok(None) };
        let length = resp
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| self.bad(op, "no Content-Length"))?;
        let blob_type = resp.header("x-ms-blob-type").unwrap_or("").to_string();
        let metadata = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                let name = n
                    .to_ascii_lowercase()
                    .strip_prefix("x-ms-meta-")?
                    .to_string();
                Some((name, resp.header(&n).unwrap_or("").to_string()))
            })
            .collect();
        Ok(Some(Properties {
            length,
            blob_type,
            metadata,
        }))
    }

    /// Put Blob: a new, all-zero page blob of `length` bytes with `metadata`. Unless
    /// `replace`, an existing blob is left alone and the call fails (`If-None-Match: *`).
    pub fn create(
        &self,
        length: u64,
        metadata: &[(&str, &str)],
        replace: bool,
    ) -> Result<(), BlobError> {
        let op = "Put Blob";
        if length % PAGE != 0 || length > crate::MAX_PAGE_BLOB {
            return Err(self.bad(op, format!("length {length} is not a page-blob length")));
        }
        let url = self.url.request_url(None);
        self.retry(|| {
            let mut req = self
                .request("PUT", &url)
                .set("x-ms-blob-type", "PageBlob")
                .set("x-ms-blob-content-length", &length.to_string())
                .set("Content-MD5", &md5_b64(&[]));
            if !replace {
                req = req.set("If-None-Match", "*");
            }
            for (k, v) in metadata {
                req = req.set(&format!("x-ms-meta-{k}"), v);
            }
            self.send(op, req.send_bytes(&[])).map(drop)
        })
    }

    /// Put Metadata: replaces the blob's user metadata.
    pub fn set_metadata(&self, metadata: &[(&str, &str)]) -> Result<(), BlobError> {
        let op = "Set Blob Metadata";
        let url = self.url.request_url(Some("metadata"));
        self.retry(|| {
            let mut req = self.request("PUT", &url).set("Content-MD5", &md5_b64(&[]));
            for (k, v) in metadata {
                req = req.set(&format!("x-ms-meta-{k}"), v);
            }
            self.send(op, req.send_bytes(&[])).map(drop)
        })
    }

    /// Put Page: writes `data` (whole pages, at most [`MAX_PAGE_WRITE`]) at `offset`.
    pub fn put_pages(&self, offset: u64, data: &[u8]) -> Result<(), BlobError> {
        let op = format!("Put Page at {offset}");
        let len = data.len() as u64;
        if offset % PAGE != 0 || len % PAGE != 0 || len == 0 || data.len() > MAX_PAGE_WRITE {
            return Err(self.bad(
                &op,
                format!("{len} bytes at {offset} is not whole pages ≤ 4 MiB"),
            ));
        }
        let url = self.url.request_url(Some("page"));
        let md5 = md5_b64(data);
        let range = format!("bytes={offset}-{}", offset + len - 1);
        self.retry(|| {
            let req = self
                .request("PUT", &url)
                .set("x-ms-page-write", "update")
                .set("x-ms-range", &range)
                .set("Content-MD5", &md5);
            self.send(&op, req.send_bytes(data)).map(drop)
        })
    }

    /// Clear Pages: makes `[offset, offset + len)` (whole pages) read as zeros again and
    /// drops it from the page ranges.
    pub fn clear_pages(&self, offset: u64, len: u64) -> Result<(), BlobError> {
        let op = format!("Clear Pages {len} bytes at {offset}");
        if offset % PAGE != 0 || len % PAGE != 0 || len == 0 {
            return Err(self.bad(&op, "not whole pages"));
        }
        let url = self.url.request_url(Some("page"));
        let range = format!("bytes={offset}-{}", offset + len - 1);
        self.retry(|| {
            let req = self
                .request("PUT", &url)
                .set("x-ms-page-write", "clear")
                .set("x-ms-range", &range)
                .set("Content-MD5", &md5_b64(&[]));
            self.send(&op, req.send_bytes(&[])).map(drop)
        })
    }

    /// Get Page Ranges over `[lo, hi)` (following continuation markers).
    pub fn page_ranges(&self, lo: u64, hi: u64) -> Result<PageRanges, BlobError> {
        let op = format!("Get Page Ranges {lo}-{hi}");
        let mut out = PageRanges::default();
        if lo >= hi {
            return Ok(out);
        }
        let mut marker: Option<String> = None;
        loop {
            let mut url = self.url.request_url(Some("pagelist"));
            if let Some(m) = &marker {
                let mut u = url::Url::parse(&url).map_err(|e| self.bad(&op, e.to_string()))?;
                u.query_pairs_mut().append_pair("marker", m);
                url = u.into();
            }
            let xml = self.retry(|| {
                let req = self
                    .request("GET", &url)
                    .set("x-ms-range", &format!("bytes={lo}-{}", hi - 1));
                let resp = self.send(&op, req.call())?;
                let mut body = String::new();
                resp.into_reader()
                    .take(MAX_PAGE_LIST_XML + 1)
                    .read_to_string(&mut body)
                    .map_err(|e| {
                        Try::Again(
                            self.transport(&op, format!("reading the answer: {e}")),
                            None,
                        )
                    })?;
                if body.len() as u64 > MAX_PAGE_LIST_XML {
                    return Err(Try::Fail(self.bad(&op, "page list larger than 64 MiB")));
                }
                Ok(body)
            })?;
            let page = ranges::parse(&xml, lo, hi).map_err(|w| self.bad(&op, w))?;
            out.extend(page.ranges);
            match page.next_marker {
                Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
                Some(m) => return Err(self.bad(&op, format!("continuation marker {m:?} repeats"))),
                None => return Ok(out),
            }
        }
    }

    /// Get Blob of `[offset, offset + buf.len())` into `buf`; exactly those bytes, their MD5
    /// checked when the range is at most 4 MiB.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlobError> {
        let op = format!("Get Blob {} bytes at {offset}", buf.len());
        if buf.is_empty() {
            return Ok(());
        }
        let url = self.url.request_url(None);
        let range = format!("bytes={offset}-{}", offset + buf.len() as u64 - 1);
        let want_md5 = buf.len() <= MAX_MD5_READ;
        self.retry(|| {
            let mut req = self.request("GET", &url).set("x-ms-range", &range);
            if want_md5 {
                req = req.set("x-ms-range-get-content-md5", "true");
            }
            let resp = self.send(&op, req.call())?;
            let fail = |w: String| Try::Fail(self.bad(&op, w));
            let length = resp
                .header("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok());
            if length != Some(buf.len() as u64) {
                return Err(fail(format!(
                    "Content-Length {length:?}, asked for {}",
                    buf.len()
                )));
            }
            let md5 = resp.header("content-md5").map(str::to_string);
            let mut r = resp.into_reader();
            r.read_exact(buf).map_err(|e| {
                Try::Again(
                    self.transport(&op, format!("reading the answer: {e}")),
                    None,
                )
            })?;
            if let (true, Some(m)) = (want_md5, md5) {
                if m != md5_b64(buf) {
                    return Err(Try::Again(
                        self.bad(&op, "the bytes do not match their Content-MD5"),
                        None,
                    ));
                }
            }
            Ok(())
        })
    }
}
