//! The control socket of a running VM (`vhdtool boot --api-socket PATH`) and its client
//! (`vhdtool vm …`).
//!
//! Protocol (version [`API_VERSION`]): one request per connection. The client sends one line
//! of JSON, at most [`MAX_MESSAGE`] bytes with the newline, e.g.
//! `{"version":1,"command":"shutdown","timeout_s":30}`; the VMM answers with one line,
//! `{"version":1,"ok":true,…}` or `{"version":1,"ok":false,"error":"…"}`, and closes.
//!
//! ```text
//!  client ──line──> API thread: bounded read (timeout), version + JSON check
//!                      │ bad input → error reply, connection closed (never a panic)
//!                      └─ ApiCall{command, reply} ──> main thread (acts: pause, resume, …)
//!  client <──line── reply thread of the call <── Reply ──┘
//! ```
//!
//! Invariants: a request is read with a deadline ([`READ_TIMEOUT`]) and a size bound, so a
//! silent or flooding client costs at most that; requests are read one at a time and the main
//! thread acts on them one at a time, but each reply is awaited by a thread of its own, so a
//! call whose reply waits for the guest (`disk-remove`, `shutdown`) does not hold up
//! `status` or a `checkpoint` (which a removal in progress then refuses); the server stops
//! after the reply threads (bounded: [`REPLY_GRACE`]); the socket file is removed when the
//! server stops. `shutdown`, `checkpoint` and `disk-remove`
//! reply when the work is done (disks flushed), so a script can chain on the reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the protocol; a request with another is refused.
pub const API_VERSION: u32 = 1;
/// Longest request or reply line, newline included.
pub const MAX_MESSAGE: usize = 64 << 10;
/// How long the server waits for a request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping server waits for replies still on their way.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// State, configuration and process of the VM.
    Status,
    /// Stop the vCPUs (devices finish what is in flight).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Press the ACPI power button; stop the VM after `timeout_s` if the guest has not powered
    /// off. The reply comes after the disks are flushed.
    Shutdown {
        /// Seconds the guest gets to power off.
        timeout_s: u64,
    },
    /// Save the VM to `dir` (absent or empty) and move its disks onto new differencing
    /// children; the VM goes on unless `stop`.
    Checkpoint {
        /// Folder of the checkpoint.
        dir: PathBuf,
        /// Stop the VM after the checkpoint.
        stop: bool,
    },
    /// Move the running VM to the target at `to` (`tcp:HOST:PORT`, a `vhdtool boot
    /// --incoming`); on success the VMM exits 0 after the reply.
    Migrate {
        /// The target.
        to: String,
        /// Longest pause of the guest to aim for, in milliseconds.
        downtime_ms: u64,
        /// Send at most this many MiB per second (none: as fast as the link goes).
        #[serde(default)]
        max_bandwidth_mib: Option<u64>,
    },
    /// Hot-add the image at `path` as a new disk (pci transport only); the reply's detail is
    /// the new disk's id.
    DiskAdd {
        /// The image (an absolute path: the VMM may run elsewhere).
        path: PathBuf,
        /// Open it read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Hot-remove a disk (an id from `status`, or its image path): the guest is asked to eject
    /// it; the reply comes once it has and the disk is drained, flushed and closed, or is an
    /// error after `timeout_s` (the disk then stays attached).
    DiskRemove {
        /// Id or image path.
        disk: String,
        /// Seconds the guest gets to eject it.
        timeout_s: u64,
    },
}

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// [`API_VERSION`] of the client.
    pub version: u32,
    /// The command and its arguments.
    #[serde(flatten)]
    pub command: Command,
}

/// A disk as reported by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Its id (`disk0`, …) for `disk-remove`.
    #[serde(default)]
    pub id: String,
    /// Its PCI device number on bus 0 (pci transport).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// The image the guest writes to now.
    pub path: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `running`, `paused` or `shutting-down`.
    pub state: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disks in guest order.
    pub disks: Vec<DiskStatus>,
    /// Process id of the VMM.
    pub pid: u32,
}

/// A reply line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// [`API_VERSION`] of the VMM.
    pub version: u32,
    /// Whether the command was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Reply {
    /// Success with a note.
    pub fn done(detail: impl Into<String>) -> Reply {
        Reply {
            version: API_VERSION,
            ok: true,
            detail: Some(detail.into()),
            ..Reply::default()
        }
    }

    /// Failure.
    pub fn failed(error: impl Into<String>) -> Reply {
        Reply {
            version: API_VERSION,
            ok: false,
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

/// A request handed to the main thread, which answers through `reply`.
pub struct ApiCall {
    /// What to do.
    pub command: Command,
    /// Where the answer goes (dropping it answers "the VMM is stopping").
    pub reply: Sender<Reply>,
}

/// Errors of the client and of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created or reached.
    #[error("API socket {path}: {what}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Another VMM listens there.
    #[error("API socket {0}: in use by a running VMM")]
    InUse(PathBuf),
    /// The VMM's answer is not a reply of this protocol.
    #[error("API socket {path}: bad reply: {detail}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// Parses one request line; the error is the message of the reply.
pub fn parse_request(line: &[u8]) -> std::result::Result<Command, String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let version = v
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or("request has no numeric \"version\"")?;
    if version != u64::from(API_VERSION) {
        return Err(format!(
            "request version {version}, this VMM speaks version {API_VERSION}"
        ));
    }
    let r: Request = serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))?;
    Ok(r.command)
}

/// Reads one line of at most [`MAX_MESSAGE`] bytes (without the newline).
fn read_line(stream: impl Read) -> std::result::Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let mut r = BufReader::new(stream.take(MAX_MESSAGE as u64));
    match r.read_until(b'\n', &mut line) {
        Ok(_) if line.last() == Some(&b'\n') => {
            line.pop();
            Ok(line)
        }
        Ok(n) if n >= MAX_MESSAGE => Err(format!("message longer than {MAX_MESSAGE} bytes")),
        Ok(_) => Err("message not terminated by a newline".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

fn encode(reply: &Reply) -> Vec<u8> {
    let mut v = serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!("{{\"version\":{API_VERSION},\"ok\":false,\"error\":\"encode: {e}\"}}").into()
    });
    v.push(b'\n');
    v
}

/// The listening side, run by a thread of the VMM.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file left by a dead VMM is replaced) and returns the
    /// server and the receiving end of its calls.
    pub fn start(path: &Path) -> Result<(ApiServer, Receiver<ApiCall>), ApiError> {
        let sock = |what, source| ApiError::Socket {
            path: path.to_path_buf(),
            what,
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|e| sock("remove the stale socket", e))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| sock("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| sock("set non-blocking", e))?;
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&listener, &tx, &s))
            .map_err(|e| sock("spawn the API thread", e))?;
        Ok((
            ApiServer {
                path: path.to_path_buf(),
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, tx: &Sender<ApiCall>, stop: &AtomicBool) {
    crate::vm::block_stop_signals();
    let mut replies: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        replies.retain(|h| !h.is_finished());
        match listener.accept() {
            Ok((stream, _)) => replies.extend(handle(stream, tx)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("API socket accept: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // Replies the main thread sent (or gave up on) just before stopping are written first.
    let start = std::time::Instant::now();
    while replies.iter().any(|h| !h.is_finished()) && start.elapsed() < REPLY_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in replies.into_iter().filter(JoinHandle::is_finished) {
        let _ = h.join();
    }
}

/// Reads one request and passes it on; returns the thread that awaits and writes its reply
/// (`None`: answered here).
fn handle(mut stream: UnixStream, tx: &Sender<ApiCall>) -> Option<JoinHandle<()>> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let command = match read_line(&stream).and_then(|l| parse_request(&l)) {
        Err(e) => {
            let _ = stream.write_all(&encode(&Reply::failed(e)));
            return None;
        }
        Ok(command) => command,
    };
    let (rtx, rrx) = channel();
    if tx
        .send(ApiCall {
            command,
            reply: rtx,
        })
        .is_err()
    {
        let _ = stream.write_all(&encode(&Reply::failed("the VMM is stopping")));
        return None;
    }
    // The stream and the reply's receiver, for whichever thread writes the reply.
    let slot = Arc::new(std::sync::Mutex::new(Some((stream, rrx))));
    let write = |slot: &std::sync::Mutex<Option<(UnixStream, Receiver<Reply>)>>| {
        let taken = slot.lock().map(|mut s| s.take()).unwrap_or(None);
        if let Some((mut stream, rrx)) = taken {
            let reply = rrx
                .recv()
                .unwrap_or_else(|_| Reply::failed("the VMM stopped before answering"));
            let _ = stream.write_all(&encode(&reply));
        }
    };
    let theirs = slot.clone();
    match std::thread::Builder::new()
        .name("api-reply".into())
        .spawn(move || write(&theirs))
    {
        Ok(h) => Some(h),
        Err(e) => {
            // No thread to spare: the reply is awaited here (requests wait behind it).
            tracing::warn!("API reply thread: {e}");
            write(&slot);
            None
        }
    }
}

/// Sends `command` to the VMM at `path` and waits up to `timeout` for the reply.
pub fn call(path: &Path, command: Command, timeout: Duration) -> Result<Reply, ApiError> {
    let sock = |what, source| ApiError::Socket {
        path: path.to_path_buf(),
        what,
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|e| sock("connect", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| sock("set timeout", e))?;
    let mut line = serde_json::to_vec(&Request {
        version: API_VERSION,
        command,
    })
    .map_err(|e| ApiError::BadReply {
        path: path.to_path_buf(),
        detail: format!("encode the request: {e}"),
    })?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| sock("send", e))?;
    let line = read_line(&s).map_err(|detail| ApiError::BadReply {
        path: path.to_path_buf(),
        detail,
    })?;
    let reply: Reply = serde_json::from_slice(&line).map_err(|e| ApiError::BadReply {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if reply.version != API_VERSION {
        return Err(ApiError::BadReply {
            path: path.to_path_buf(),
            detail: format!(
                "VMM speaks version {}, this client {API_VERSION}",
                reply.version
            ),
        });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_carry_their_arguments() {
        let line = br#"{"version":1,"command":"shutdown","timeout_s":7}"#;
        assert_eq!(
            parse_request(line).unwrap(),
            Command::Shutdown { timeout_s: 7 }
        );
        assert_eq!(
            parse_request(br#"{"version":1,"command":"status"}"#).unwrap(),
            Command::Status
        );
        let add = br#"{"version":1,"command":"disk-add","path":"/i/a.vhdx"}"#;
        assert_eq!(
            parse_request(add).unwrap(),
            Command::DiskAdd {
                path: "/i/a.vhdx".into(),
                read_only: false
            },
            "read_only defaults to false"
        );
        let remove = br#"{"version":1,"command":"disk-remove","disk":"disk3","timeout_s":5}"#;
        assert_eq!(
            parse_request(remove).unwrap(),
            Command::DiskRemove {
                disk: "disk3".into(),
                timeout_s: 5
            }
        );
        let e = parse_request(br#"{"version":1,"command":"disk-remove","disk":"d"}"#);
        assert!(e.unwrap_err().contains("timeout_s"));
        // A status from a VMM without disk ids still parses.
        let old: DiskStatus = serde_json::from_str(r#"{"path":"/a","read_only":true}"#).unwrap();
        assert_eq!((old.id.as_str(), old.pci_slot), ("", None));
    }

    #[test]
    fn hostile_requests_get_error_messages() {
        for (line, want) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"command":"status"}"#, "version"),
            (br#"{"version":2,"command":"status"}"#, "version 2"),
            (br#"{"version":1,"command":"format-disk"}"#, "bad request"),
            (br#"{"version":1,"command":"shutdown"}"#, "bad request"),
            (br#"[1,2,3]"#, "version"),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn oversized_or_unterminated_lines_are_refused() {
        let big = vec![b'x'; MAX_MESSAGE + 10];
        assert!(read_line(&big[..]).unwrap_err().contains("longer"));
        assert!(read_line(&b"{}"[..]).unwrap_err().contains("newline"));
        assert_eq!(read_line(&b"{}\nrest"[..]).unwrap(), b"{}");
    }

    #[test]
    fn server_answers_garbage_with_an_error_and_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (server, rx) = ApiServer::start(&path).unwrap();
        assert!(matches!(ApiServer::start(&path), Err(ApiError::InUse(_))));
        // Garbage, then a silent client that hangs up, then a real call.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"\x00\xff garbage\n").unwrap();
        let reply: Reply = serde_json::from_slice(&read_line(&s).unwrap()).unwrap();
        assert!(!reply.ok && reply.error.unwrap().contains("not JSON"));
        drop(UnixStream::connect(&path).unwrap());
        let main = std::thread::spawn(move || {
            let call = rx.recv().unwrap();
            assert_eq!(call.command, Command::Pause);
            call.reply.send(Reply::done("paused")).unwrap();
        });
        let r = call(&path, Command::Pause, Duration::from_secs(10)).unwrap();
        assert!(r.ok && r.detail.as_deref() == Some("paused"));
        main.join().unwrap();
        drop(server);
        assert!(!path.exists(), "socket removed");
    }
}
