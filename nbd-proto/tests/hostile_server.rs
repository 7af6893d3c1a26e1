//! The client against servers that misbehave: silent, closing mid-reply, sending replies too
//! long, outside the request, for another cookie, or not speaking NBD at all. Each must end
//! in a typed error naming the server, quickly, with nothing allocated for the lengths they
//! claim, and a connection that failed must refuse further requests instead of reading stale
//! bytes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd_proto::protocol::{self as p, chunk, cmd, errno, opt, rep, tflag};
use nbd_proto::{Client, ClientError, Uri};

const SIZE: u64 = 1 << 20;

/// A one-connection fake server on a Unix socket in a temporary directory.
struct Fake {
    _dir: tempfile::TempDir,
    uri: Uri,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    /// Runs `behave` on the first connection.
    fn start(timeout: &str, behave: impl FnOnce(UnixStream) + Send + 'static) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let sock: PathBuf = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let thread = std::thread::spawn(move || {
            if let Ok((s, _)) = listener.accept() {
                behave(s);
            }
        });
        let uri = Uri::parse(&format!(
            "nbd+unix:///?socket={}&timeout={timeout}",
            sock.display()
        ))
        .unwrap();
        Fake {
            _dir: dir,
            uri,
            thread: Some(thread),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_u32(s: &mut UnixStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

/// Plays a well-behaved handshake (structured replies, base:allocation, GO) and returns
/// when the client is in transmission.
fn handshake(s: &mut UnixStream) {
    s.write_all(&p::greeting()).unwrap();
    let _client_flags = read_u32(s);
    loop {
        let mut h = [0u8; p::OPTION_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let o = p::parse_option_header(&h).unwrap();
        let mut data = vec![0u8; o.len as usize];
        s.read_exact(&mut data).unwrap();
        match o.option {
            opt::STRUCTURED_REPLY => s.write_all(&p::option_reply(o.option, rep::ACK, &[])),
            opt::SET_META_CONTEXT => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(p::BASE_ALLOCATION.as_bytes());
                s.write_all(&p::option_reply(o.option, rep::META_CONTEXT, &d))
                    .unwrap();
                s.write_all(&p::option_reply(o.option, rep::ACK, &[]))
            }
            opt::GO => {
                let flags = tflag::HAS_FLAGS | tflag::SEND_FLUSH;
                let info = p::info_export(SIZE, flags);
                s.write_all(&p::option_reply(o.option, rep::INFO, &info))
                    .unwrap();
                s.write_all(&p::option_reply(o.option, rep::ACK, &[]))
                    .unwrap();
                return;
            }
            _ => s.write_all(&p::option_reply(o.option, rep::ERR_UNSUP, &[])),
        }
        .unwrap();
    }
}

/// Reads one request header.
fn request(s: &mut UnixStream) -> p::Request {
    let mut h = [0u8; p::REQUEST_LEN];
    s.read_exact(&mut h).unwrap();
    p::parse_request(&h).unwrap()
}

/// A structured chunk header.
fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut b = vec![0u8; p::CHUNK_HEADER_LEN];
    p::chunk_header(&mut b, flags, kind, cookie, len);
    b
}

fn assert_names_peer(e: &ClientError, uri: &Uri) {
    assert!(e.to_string().contains(&uri.text), "{e}");
}

#[test]
fn silent_server_times_out_naming_the_server() {
    let fake = Fake::start("0.5", |mut s| {
        handshake(&mut s);
        let _ = request(&mut s);
        std::thread::sleep(Duration::from_secs(3));
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let t = Instant::now();
    let e = c.read(&mut [0u8; 512], 0).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.io_kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("no answer"), "{e}");
    assert_names_peer(&e, &fake.uri);
}

#[test]
fn server_closing_in_the_middle_of_read_data_is_an_end_of_stream_error() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        s.write_all(&chunk_header(
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            r.cookie,
            8 + r.len,
        ))
        .unwrap();
        s.write_all(&r.offset.to_be_bytes()).unwrap();
        s.write_all(&[7u8; 100]).unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let e = c.read(&mut [0u8; 4096], 0).unwrap_err();
    assert_eq!(e.io_kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");
    // The stream is out of step: later requests fail at once.
    let again = c.read(&mut [0u8; 512], 0).unwrap_err();
    assert!(again.to_string().contains("failed earlier"), "{again}");
}

#[test]
fn data_chunk_outside_the_requested_range_is_refused() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        s.write_all(&chunk_header(
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            r.cookie,
            8 + 512,
        ))
        .unwrap();
        s.write_all(&(r.offset + 4096).to_be_bytes()).unwrap();
        s.write_all(&[1u8; 512]).unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let mut buf = vec![0xeeu8; 1024];
    let e = c.read(&mut buf, 0).unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("outside the read"), "{e}");
    assert_names_peer(&e, &fake.uri);
}

#[test]
fn data_chunk_longer_than_the_request_is_refused_before_reading_it() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        // Claims 4 GiB of data for a 512-byte read.
        s.write_all(&chunk_header(
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            r.cookie,
            u32::MAX,
        ))
        .unwrap();
        s.write_all(&r.offset.to_be_bytes()).unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let e = c.read(&mut [0u8; 512], 0).unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
}

#[test]
fn read_reply_covering_less_than_asked_is_refused() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        s.write_all(&p::hole_chunk(
            chunk::FLAG_DONE,
            r.cookie,
            r.offset,
            r.len / 2,
        ))
        .unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let e = c.read(&mut [0u8; 4096], 0).unwrap_err();
    assert!(e.to_string().contains("covered 2048 of 4096"), "{e}");
}

#[test]
fn reply_for_another_cookie_is_refused() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        let mut b = [0u8; p::SIMPLE_HEADER_LEN];
        p::simple_header(&mut b, 0, r.cookie + 1);
        s.write_all(&b).unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let e = c.flush().unwrap_err();
    assert!(e.to_string().contains("cookie"), "{e}");
}

#[test]
fn oversized_option_reply_is_refused_without_allocating_it() {
    let fake = Fake::start("5", |mut s| {
        s.write_all(&p::greeting()).unwrap();
        let _ = read_u32(&mut s);
        let mut h = [0u8; p::OPTION_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let o = p::parse_option_header(&h).unwrap();
        let mut r = p::option_reply(o.option, rep::INFO, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&r).unwrap();
    });
    let e = Client::connect(&fake.uri).unwrap_err();
    assert!(e.to_string().contains("at most 65536"), "{e}");
    assert_names_peer(&e, &fake.uri);
}

#[test]
fn oversized_block_status_chunk_is_refused() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        assert_eq!(r.kind, cmd::BLOCK_STATUS);
        s.write_all(&chunk_header(
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS,
            r.cookie,
            1 << 30,
        ))
        .unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    assert!(c.has_block_status());
    let e = c.block_status(0, SIZE).unwrap_err();
    assert!(
        e.to_string()
            .contains("block status chunk of 1073741824 bytes"),
        "{e}"
    );
}

#[test]
fn error_chunk_becomes_a_command_error_with_the_server_message() {
    let fake = Fake::start("5", |mut s| {
        handshake(&mut s);
        let r = request(&mut s);
        s.write_all(&p::error_chunk(r.cookie, errno::EIO, "disk on fire"))
            .unwrap();
    });
    let mut c = Client::connect(&fake.uri).unwrap();
    let e = c.read(&mut [0u8; 512], 512).unwrap_err();
    match &e {
        ClientError::Command {
            errno,
            message,
            offset,
            ..
        } => {
            assert_eq!(
                (*errno, message.as_str(), *offset),
                (5, "disk on fire", 512)
            );
        }
        other => panic!("{other}"),
    }
    assert_names_peer(&e, &fake.uri);
}

#[test]
fn peer_that_does_not_speak_nbd_is_refused() {
    let fake = Fake::start("5", |mut s| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let e = Client::connect(&fake.uri).unwrap_err();
    assert!(e.to_string().contains("not an NBD server"), "{e}");
}

#[test]
fn unknown_export_is_refused_with_the_server_reason() {
    let fake = Fake::start("5", |mut s| {
        s.write_all(&p::greeting()).unwrap();
        let _ = read_u32(&mut s);
        loop {
            let mut h = [0u8; p::OPTION_HEADER_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let o = p::parse_option_header(&h).unwrap();
            let mut data = vec![0u8; o.len as usize];
            s.read_exact(&mut data).unwrap();
            let kind = if o.option == opt::GO {
                rep::ERR_UNKNOWN
            } else {
                rep::ERR_UNSUP
            };
            s.write_all(&p::option_reply(o.option, kind, b"no such disk"))
                .unwrap();
        }
    });
    let e = Client::connect(&fake.uri).unwrap_err();
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    assert!(
        e.to_string().contains("no such export: no such disk"),
        "{e}"
    );
}
