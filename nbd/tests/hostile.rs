//! The server against clients that break the rules: random bytes, requests past the end,
//! lengths over the maximum, clients vanishing mid-write, more clients than allowed. Each
//! gets an NBD error or a closed connection, never a panic, and a well-behaved client is
//! served correctly afterwards. The server runs in this process on a Unix socket, so
//! `Server::panicked_connections` shows any panic of a connection thread.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhdkit_tests::pattern_at as pattern;

use block_backend::{OpenOptions, SharedDisk, SharedOptions};
use nbd::protocol::{self as p, cflag, chunk, cmd, errno, opt, rep};
use nbd::raw_client::{meta_data, RawClient};
use nbd::{Export, Server, ServerConfig};

const SIZE: u64 = 4 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    server: Server,
}

fn rig(max_connections: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.raw");
    std::fs::write(&image, pattern(0, SIZE as usize)).unwrap();
    let disk = block_backend::open(&image, OpenOptions::read_write()).unwrap();
    let server = Server::new(ServerConfig {
        export: Export {
            name: "x".into(),
            description: None,
            disk: SharedDisk::with_options(Box::new(disk), SharedOptions::default()),
        },
        tls: None,
        max_connections,
        handshake_timeout: Duration::from_secs(5),
    });
    let socket = dir.path().join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve_unix(listener));
    Rig {
        _dir: dir,
        image,
        socket,
        server,
    }
}

impl Rig {
    fn connect(&self) -> RawClient<UnixStream> {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient::handshake(s, 3).unwrap()
    }

    fn client(&self, structured: bool) -> RawClient<UnixStream> {
        let mut c = self.connect();
        let (size, _) = c.go("", structured, structured).unwrap();
        assert_eq!(size, SIZE);
        c
    }

    /// A well-behaved client still reads the right bytes, and no connection panicked.
    fn still_serves(&self) {
        let mut c = self.client(false);
        c.request(0, cmd::READ, 9, 8192, 4096, &[]).unwrap();
        let (err, cookie, data) = c.simple_reply(4096).unwrap();
        assert_eq!((err, cookie), (0, 9));
        assert_eq!(data, std::fs::read(&self.image).unwrap()[8192..12288]);
        assert_eq!(self.server.panicked_connections(), 0);
    }

    fn wait_idle(&self) {
        let t = Instant::now();
        while self.server.active_connections() > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "connections linger");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// xorshift: reproducible random bytes without a dependency.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads until the server closes the connection (or 10 s pass).
fn drain_until_closed(s: &mut UnixStream) {
    let mut b = [0u8; 65536];
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
}

#[test]
fn random_bytes_in_any_phase_end_the_connection_not_the_server() {
    let r = rig(64);
    for seed in 0..40u64 {
        let junk = random_bytes(seed, 64 + (seed as usize * 97) % 4000);
        let mut c = match seed % 3 {
            // Right after the greeting (as client flags and options).
            0 => RawClient {
                stream: UnixStream::connect(&r.socket).unwrap(),
            },
            // During option haggling.
            1 => r.connect(),
            // In transmission, with or without structured replies.
            _ => r.client(seed % 2 == 0),
        };
        c.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = c.stream.write_all(&junk);
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        drain_until_closed(&mut c.stream);
    }
    r.wait_idle();
    r.still_serves();
}

#[test]
fn requests_past_the_end_get_errors_and_the_connection_goes_on() {
    let r = rig(8);
    let mut c = r.client(false);
    c.request(0, cmd::READ, 1, SIZE - 512, 1024, &[]).unwrap();
    assert_eq!(c.simple_reply(1024).unwrap().0, errno::EINVAL);
    c.request(0, cmd::READ, 2, u64::MAX - 10, 100, &[]).unwrap();
    assert_eq!(c.simple_reply(100).unwrap().0, errno::EINVAL);
    c.request(0, cmd::WRITE, 3, SIZE, 512, &[7u8; 512]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::ENOSPC);
    c.request(0, cmd::WRITE_ZEROES, 4, SIZE - 4096, 8192, &[])
        .unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::ENOSPC);
    c.request(0, cmd::TRIM, 5, SIZE, 1, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::EINVAL);
    // Unknown command and unknown flags.
    c.request(0, 99, 6, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::EINVAL);
    c.request(cflag::NO_HOLE, cmd::WRITE, 7, 0, 4, b"abcd")
        .unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::EINVAL);
    // BLOCK_STATUS without a negotiated context.
    c.request(0, cmd::BLOCK_STATUS, 8, 0, 4096, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::EINVAL);
    // The disk is unchanged and the same connection still reads.
    c.request(0, cmd::READ, 10, SIZE - 4096, 4096, &[]).unwrap();
    let (e, cookie, data) = c.simple_reply(4096).unwrap();
    assert_eq!((e, cookie), (0, 10));
    assert_eq!(data, pattern(SIZE - 4096, 4096));
    r.still_serves();
}

#[test]
fn lengths_over_the_maximum_are_refused_without_allocating_them() {
    let r = rig(8);
    let mut c = r.client(true);
    c.request(0, cmd::READ, 1, 0, u32::MAX, &[]).unwrap();
    let reply = c.structured_reply().unwrap();
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].kind, chunk::ERROR);
    assert_eq!(reply[0].payload[..4], errno::EOVERFLOW.to_be_bytes());
    // A write over the maximum: its payload is read and dropped, the stream stays in step.
    let big = p::MAX_PAYLOAD + 4096;
    c.request(0, cmd::WRITE, 2, 0, big, &vec![1u8; big as usize])
        .unwrap();
    let reply = c.structured_reply().unwrap();
    assert_eq!(reply[0].payload[..4], errno::EOVERFLOW.to_be_bytes());
    c.request(0, cmd::READ, 3, 0, 512, &[]).unwrap();
    let reply = c.structured_reply().unwrap();
    assert_eq!(reply[0].kind, chunk::OFFSET_DATA);
    assert_eq!(reply[0].payload[8..], pattern(0, 512)[..]);
    // An option over the option limit is drained and refused with TOO_BIG.
    let mut o = r.connect();
    let replies = o
        .option(opt::LIST, &vec![0u8; (p::MAX_OPTION_LEN + 1) as usize])
        .unwrap();
    assert_eq!(replies.last().unwrap().0, rep::ERR_TOO_BIG);
    let (size, _) = o.go("x", false, false).unwrap();
    assert_eq!(size, SIZE);
    r.still_serves();
}

#[test]
fn a_client_vanishing_mid_write_leaves_flushed_writes_and_no_torn_payload() {
    let r = rig(8);
    let mut c = r.client(false);
    c.request(0, cmd::WRITE, 1, 4096, 4096, &[0xaa; 4096])
        .unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    c.request(0, cmd::FLUSH, 2, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    // Half a payload, then gone.
    c.request(0, cmd::WRITE, 3, 65536, 8192, &[0xbb; 4096])
        .unwrap();
    drop(c);
    r.wait_idle();
    let bytes = std::fs::read(&r.image).unwrap();
    assert_eq!(bytes[4096..8192], [0xaa; 4096]);
    assert_eq!(
        bytes[65536..65536 + 8192],
        pattern(65536, 8192)[..],
        "an incomplete write must not be applied"
    );
    r.still_serves();
}

#[test]
fn clients_over_the_limit_are_closed_and_the_rest_served() {
    let r = rig(4);
    let idle: Vec<_> = (0..4).map(|_| r.connect()).collect();
    // The fifth is closed without a greeting.
    let mut extra = UnixStream::connect(&r.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap(), 0);
    drop(idle);
    r.wait_idle();
    // Many at once, each writing and reading its own range.
    let r = Arc::new(rig(32));
    let threads: Vec<_> = (0..24u64)
        .map(|i| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut c = r.client(i % 2 == 0);
                let data = random_bytes(i + 1, 16384);
                let off = i * 65536;
                c.request(cflag::FUA, cmd::WRITE, i, off, 16384, &data)
                    .unwrap();
                // Replies without data are simple replies, structured or not.
                assert_eq!(c.simple_reply(0).unwrap().0, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let bytes = std::fs::read(&r.image).unwrap();
    for i in 0..24u64 {
        let off = (i * 65536) as usize;
        assert_eq!(bytes[off..off + 16384], random_bytes(i + 1, 16384)[..]);
    }
    r.still_serves();
}

#[test]
fn structured_reads_send_zero_ranges_as_holes_and_block_status_reports_them() {
    let r = rig(8);
    let mut c = r.client(true);
    // Punch a hole (raw files support it), then read across it.
    c.request(0, cmd::TRIM, 1, 1 << 20, 1 << 20, &[]).unwrap();
    let (e, _, _) = c.simple_reply(0).unwrap();
    assert_eq!(e, 0);
    c.request(0, cmd::READ, 2, 512 << 10, 2 << 20, &[]).unwrap();
    let chunks = c.structured_reply().unwrap();
    let mut got = vec![0xffu8; 2 << 20];
    let mut holes = 0;
    for ch in &chunks {
        let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) - (512 << 10);
        match ch.kind {
            chunk::OFFSET_DATA => got[off as usize..off as usize + ch.payload.len() - 8]
                .copy_from_slice(&ch.payload[8..]),
            chunk::OFFSET_HOLE => {
                holes += 1;
                let n = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                got[off as usize..off as usize + n].fill(0);
            }
            k => panic!("unexpected chunk {k}"),
        }
    }
    assert!(holes >= 1, "{chunks:?}");
    let mut want = pattern(512 << 10, 2 << 20);
    want[512 << 10..(512 << 10) + (1 << 20)].fill(0);
    assert!(got == want, "reassembled read differs");
    c.request(cflag::REQ_ONE, cmd::BLOCK_STATUS, 3, 1 << 20, 4096, &[])
        .unwrap();
    let bs = c.structured_reply().unwrap();
    assert_eq!(bs[0].kind, chunk::BLOCK_STATUS);
    assert_eq!(bs[0].payload.len(), 12);
    assert_eq!(
        u32::from_be_bytes(bs[0].payload[8..12].try_into().unwrap()),
        p::STATE_HOLE | p::STATE_ZERO
    );
    r.still_serves();
}

#[test]
fn meta_context_needs_structured_replies_and_unknown_exports_are_refused() {
    let r = rig(8);
    let mut c = r.connect();
    let replies = c
        .option(opt::SET_META_CONTEXT, &meta_data("", &[p::BASE_ALLOCATION]))
        .unwrap();
    assert_eq!(replies.last().unwrap().0, rep::ERR_INVALID);
    let replies = c
        .option(opt::GO, &nbd::raw_client::info_data("nope", &[]))
        .unwrap();
    assert_eq!(replies.last().unwrap().0, rep::ERR_UNKNOWN);
    let replies = c.option(opt::STARTTLS, &[]).unwrap();
    assert_eq!(replies.last().unwrap().0, rep::ERR_POLICY);
    let replies = c.option(12345, &[1, 2, 3]).unwrap();
    assert_eq!(replies.last().unwrap().0, rep::ERR_UNSUP);
    c.send_option(opt::ABORT, &[]).unwrap();
    assert_eq!(c.option_reply().unwrap().0, rep::ACK);
    r.still_serves();
}
