//! The NBD server (crate `nbd`) under a fuzzer-controlled client: handshake, option haggling and
//! transmission requests, as one byte stream.
//!
//! ```text
//!   input: [mode] [client bytes ...]
//!     mode & 3 == 0: the bytes start right after the server's greeting (client flags, options…)
//!     mode & 3 == 1: a valid handshake first (structured replies, base:allocation, GO), then
//!                    the bytes as requests
//!     mode & 3 >= 2: a plain handshake first (simple replies, GO), then the bytes as requests
//!     mode & 4:      the export is read-only
//!   server: Server::serve_connection over an in-memory stream; a 1 MiB raw disk
//! ```
//!
//! Oracles beyond "no panic": the connection ends (the input is finite, so every wait for
//! bytes ends at its end); the disk file keeps its size; a read-only export leaves it
//! byte-identical; the server's output starts with the greeting and, once in transmission,
//! is a sequence of well-formed replies (simple replies to requests whose cookie was sent,
//! or structured chunks) — checked by [`check_replies`] where the requests can be followed.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use block_backend::{OpenOptions, SharedDisk, SharedOptions};
use nbd::protocol::{self as p, opt};
use nbd::raw_client::{info_data, meta_data};
use nbd::{Export, Server, ServerConfig};

/// Size of the disk the server exports.
const DISK: usize = 1 << 20;

/// The client side of a connection: reads come from the input, writes are kept.
struct Mem<'a> {
    input: &'a [u8],
    out: Vec<u8>,
}

impl Read for Mem<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        // Bounded: more output than this means the server answers far more than it is asked.
        assert!(
            self.out.len() < 256 << 20,
            "server output grows without bound"
        );
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

static DIR: OnceLock<PathBuf> = OnceLock::new();

fn scratch() -> &'static PathBuf {
    DIR.get_or_init(|| crate::make_scratch_dir("nbd-server"))
}

/// Removes this process's scratch directory (made again by the next input if needed).
pub(crate) fn cleanup() {
    if let Some(d) = DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn pattern() -> Vec<u8> {
    (0..DISK).map(|i| (i % 253) as u8).collect()
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The client bytes of a valid handshake (structured replies and block status when asked).
pub fn handshake_bytes(structured: bool) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    if structured {
        option(&mut b, opt::STRUCTURED_REPLY, &[]);
        option(
            &mut b,
            opt::SET_META_CONTEXT,
            &meta_data("", &[p::BASE_ALLOCATION]),
        );
    }
    option(&mut b, opt::GO, &info_data("", &[p::info::BLOCK_SIZE]));
    b
}

/// Fuzz target body.
pub fn nbd_server(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let read_only = mode & 4 != 0;
    let prefix = match mode & 3 {
        0 => Vec::new(),
        1 => handshake_bytes(true),
        _ => handshake_bytes(false),
    };
    let dir = scratch();
    std::fs::create_dir_all(dir).expect("create the scratch directory");
    let path = dir.join("disk.raw");
    let before = pattern();
    std::fs::write(&path, &before).expect("write the scratch disk");
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let disk = block_backend::open(&path, opts).expect("open the scratch disk");
    let server = Server::new(ServerConfig {
        export: Export {
            name: "fuzz".into(),
            description: None,
            disk: SharedDisk::with_options(Box::new(disk), SharedOptions::default()),
        },
        tls: None,
        max_connections: 1,
        handshake_timeout: Duration::from_secs(1),
    });
    let mut input = prefix.clone();
    input.extend_from_slice(rest);
    let mut stream = Mem {
        input: &input,
        out: Vec::new(),
    };
    let _ = server.serve_connection(&mut stream, "fuzz");
    let out = stream.out;
    assert!(
        out.len() >= 18 && out[..16] == p::greeting()[..16],
        "no greeting"
    );
    server
        .export()
        .disk
        .close()
        .expect("close the scratch disk");
    let after = std::fs::read(&path).expect("read the scratch disk");
    assert_eq!(after.len(), DISK, "the disk file changed size");
    if read_only {
        assert!(after == before, "a read-only export was written");
    }
}

impl nbd::Stream for &mut Mem<'_> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Seeds: each mode with a few well-formed requests (and the option sequence of a full client
/// for mode 0).
pub fn nbd_server_seeds() -> Vec<(String, Vec<u8>)> {
    use p::{cflag, cmd};
    let req = |flags: u16, kind: u16, cookie: u64, offset: u64, len: u32| {
        let mut b = p::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    };
    let mut requests = Vec::new();
    requests.extend(req(0, cmd::READ, 1, 4096, 4096));
    requests.extend(req(cflag::FUA, cmd::WRITE, 2, 512, 8));
    requests.extend_from_slice(b"12345678");
    requests.extend(req(0, cmd::TRIM, 3, 65536, 65536));
    requests.extend(req(0, cmd::READ, 4, 0, 256 << 10));
    requests.extend(req(cflag::NO_HOLE, cmd::WRITE_ZEROES, 5, 8192, 4096));
    requests.extend(req(cflag::REQ_ONE, cmd::BLOCK_STATUS, 6, 0, 1 << 20));
    requests.extend(req(0, cmd::BLOCK_STATUS, 7, 4096, 200_000));
    requests.extend(req(0, cmd::FLUSH, 8, 0, 0));
    requests.extend(req(0, cmd::CACHE, 9, 0, 4096));
    requests.extend(req(0, cmd::READ, 10, (1 << 20) - 100, 200));
    requests.extend(req(0, cmd::DISC, 11, 0, 0));
    let mut options = 3u32.to_be_bytes().to_vec();
    option(&mut options, opt::LIST, &[]);
    option(&mut options, opt::STRUCTURED_REPLY, &[]);
    option(
        &mut options,
        opt::LIST_META_CONTEXT,
        &meta_data("fuzz", &["base:"]),
    );
    option(
        &mut options,
        opt::SET_META_CONTEXT,
        &meta_data("fuzz", &[p::BASE_ALLOCATION, "x:y"]),
    );
    option(&mut options, opt::INFO, &info_data("fuzz", &[0, 1, 2, 3]));
    option(&mut options, opt::STARTTLS, &[]);
    option(&mut options, opt::GO, &info_data("fuzz", &[]));
    options.extend_from_slice(&requests);
    let mut export_name = 1u32.to_be_bytes().to_vec();
    option(&mut export_name, opt::EXPORT_NAME, b"fuzz");
    export_name.extend_from_slice(&requests);
    let with = |mode: u8, body: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(body);
        v
    };
    vec![
        ("seed-options".into(), with(0, &options)),
        ("seed-export-name".into(), with(0, &export_name)),
        ("seed-structured".into(), with(1, &requests)),
        ("seed-simple".into(), with(2, &requests)),
        ("seed-read-only".into(), with(5, &requests)),
    ]
}
