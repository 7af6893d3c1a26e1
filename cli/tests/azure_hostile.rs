//! `vhdtool upload`/`download` against small HTTP servers of the test's own: one that records
//! every request (to check headers, Content-MD5, what is sent and in which order), and hostile
//! ones (error statuses forever, garbage, lying lengths). Every failure must be a clear error
//! naming the blob, never its SAS signature, and never a hang.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use md5::{Digest, Md5};
use support::{fails, ok, vhdtool};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Reads one request; `None` at end of stream or on garbage.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

type Respond = dyn Fn(&Request) -> Vec<u8> + Send + Sync;

/// A server on 127.0.0.1 answering each request with `respond`; records every request.
fn serve(respond: Arc<Respond>) -> (u16, Arc<Mutex<Vec<Request>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = Arc::clone(&log);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (respond, log) = (Arc::clone(&respond), Arc::clone(&log2));
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                while let Some(req) = read_request(&mut r) {
                    let answer = respond(&req);
                    log.lock().unwrap().push(req);
                    if w.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, log)
}

fn status(code: u16, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} X\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/devstoreaccount1/c/d.vhd?sv=2021-08-06&sig=SECRETSIG")
}

fn image(dir: &TempDir) -> std::path::PathBuf {
    let p = dir.path().join("s.vhdx");
    ok(&vhdtool(&[&"create", &p, &"6M"]));
    let input = dir.path().join("in");
    std::fs::write(&input, vhdkit_tests::noise(1, 8192)).unwrap();
    ok(&vhdtool(&[
        &"write",
        &"--offset",
        &"1M",
        &"--input",
        &input,
        &p,
    ]));
    p
}

#[test]
fn every_request_is_versioned_dated_and_md5_checked_and_footer_goes_last() {
    let dir = TempDir::new().unwrap();
    let src = image(&dir);
    let (port, log) = serve(Arc::new(|r: &Request| match r.method.as_str() {
        "HEAD" => status(404, "x-ms-error-code: BlobNotFound\r\n", ""),
        _ => status(201, "", ""),
    }));
    ok(&vhdtool(&[&"upload", &src, &url(port)]));
    let log = log.lock().unwrap().clone();
    let md5 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(Md5::digest(b));
    for r in &log {
        assert!(r.headers.contains_key("x-ms-version"), "{r:?}");
        assert!(r.headers.contains_key("x-ms-date"), "{r:?}");
        if r.method == "PUT" {
            assert_eq!(
                r.headers.get("content-md5"),
                Some(&md5(&r.body)),
                "{}",
                r.target
            );
        }
    }
    let create = &log[1];
    assert!(!create.target.contains("comp="));
    assert_eq!(create.headers["x-ms-blob-type"], "PageBlob");
    assert_eq!(
        create.headers["x-ms-blob-content-length"],
        (6 * MIB + 512).to_string()
    );
    assert_eq!(create.headers["if-none-match"], "*");
    let pages: Vec<&Request> = log
        .iter()
        .filter(|r| r.target.contains("comp=page"))
        .collect();
    assert_eq!(pages.len(), 2, "one data run and the footer");
    assert_eq!(
        pages[0].headers["x-ms-range"],
        format!("bytes={}-{}", MIB, MIB + 8191)
    );
    assert_eq!(pages[0].body, vhdkit_tests::noise(1, 8192));
    let last = pages[1];
    assert_eq!(
        last.headers["x-ms-range"],
        format!("bytes={}-{}", 6 * MIB, 6 * MIB + 511)
    );
    assert_eq!(&last.body[..8], b"conectix");
}

/// Runs `vhdtool ARGS`, which must fail within 60 s; returns stderr.
fn fails_quickly(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let t = Instant::now();
    let err = fails(&vhdtool(args));
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("127.0.0.1:") && err.contains("/c/d.vhd"),
        "{err}"
    );
    assert!(!err.contains("SECRETSIG"), "the signature leaked: {err}");
    err
}

#[test]
fn server_errors_are_retried_then_reported_naming_the_blob() {
    let dir = TempDir::new().unwrap();
    let src = image(&dir);
    let (port, log) = serve(Arc::new(|_: &Request| {
        status(503, "x-ms-error-code: ServerBusy\r\n", "")
    }));
    let err = fails_quickly(&[&"upload", &src, &url(port)]);
    assert!(err.contains("503") && err.contains("ServerBusy"), "{err}");
    assert_eq!(log.lock().unwrap().len(), 6, "six tries in all");
}

#[test]
fn garbage_answers_fail_cleanly() {
    let dir = TempDir::new().unwrap();
    let src = image(&dir);
    let (port, _) = serve(Arc::new(|_: &Request| b"garbage\r\n\r\n".to_vec()));
    fails_quickly(&[&"upload", &src, &url(port)]);
    fails_quickly(&[&"download", &url(port), &dir.path().join("o.vhdx")]);
    assert!(!dir.path().join("o.vhdx").exists());
}

#[test]
fn lying_blob_lengths_and_page_lists_are_refused() {
    let dir = TempDir::new().unwrap();
    // HEAD claims a 1 TiB blob; ranged reads return fewer bytes than asked.
    let (port, _) = serve(Arc::new(|r: &Request| match r.method.as_str() {
        "HEAD" => {
            b"HTTP/1.1 200 OK\r\nx-ms-blob-type: PageBlob\r\nContent-Length: 1099511627776\r\n\r\n"
                .to_vec()
        }
        _ => status(206, "", "short"),
    }));
    let err = fails_quickly(&[&"download", &url(port), &dir.path().join("o.vhdx")]);
    assert!(err.contains("Content-Length"), "{err}");
    // A page list of ranges that are not whole pages.
    let (port, _) = serve(Arc::new(|r: &Request| {
        if r.method == "HEAD" {
            return b"HTTP/1.1 200 OK\r\nx-ms-blob-type: PageBlob\r\nContent-Length: 2097664\r\n\r\n"
                .to_vec();
        }
        if r.target.contains("comp=pagelist") {
            return status(
                200,
                "",
                "<PageList><PageRange><Start>1</Start><End>100</End></PageRange></PageList>",
            );
        }
        let footer = fixed_footer(2 * MIB);
        let mut a =
            format!("HTTP/1.1 206 P\r\nContent-Length: {}\r\n\r\n", footer.len()).into_bytes();
        a.extend_from_slice(&footer);
        a
    }));
    let err = fails_quickly(&[&"download", &url(port), &dir.path().join("o.vhdx")]);
    assert!(
        err.contains("invalid answer") && err.contains("page range"),
        "{err}"
    );
    assert!(!dir.path().join("o.vhdx").exists());
}

/// The footer of a fixed VHD of `size` bytes, as vhdtool writes it.
fn fixed_footer(size: u64) -> Vec<u8> {
    vhd::Footer::new_vhdkit(size, vhd::DiskType::Fixed, uuid::Uuid::nil(), 0)
        .to_bytes()
        .to_vec()
}
