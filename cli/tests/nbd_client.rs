//! vhdtool as an NBD client (`nbd+unix://`, `nbds+unix://` URIs where an image path goes),
//! against real servers: `vhdtool serve`, qemu-nbd and nbdkit, with nbdinfo, nbdcopy and
//! qemu-img as independent checks of what it read and wrote. Also a local differencing child
//! over an export, and a server that stops answering.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vhdkit_tests::{noise, tool_or_skip};

mod support;
use support::nbd_peer::{make_pki, Served};
use support::{fails, json, ok, vhdtool};

const MIB: u64 = 1 << 20;

/// A dynamic VHDX of `size` with `bytes` written at `offset`.
fn vhdx_with(dir: &Path, name: &str, size: u64, offset: u64, bytes: &[u8]) -> PathBuf {
    let image = dir.join(name);
    ok(&vhdtool(&[
        &"create",
        &"--block-size",
        &"1M",
        &image,
        &size.to_string(),
    ]));
    let input = dir.join(format!("{name}.in"));
    std::fs::write(&input, bytes).unwrap();
    ok(&vhdtool(&[
        &"write",
        &image,
        &"--offset",
        &offset.to_string(),
        &"--input",
        &input,
    ]));
    image
}

fn read_uri(uri: &str, offset: u64, len: u64) -> Vec<u8> {
    let out = vhdtool(&[
        &"read",
        &uri,
        &"--offset",
        &offset.to_string(),
        &"--length",
        &len.to_string(),
    ]);
    ok(&out);
    out.stdout
}

/// A server process started by the test, killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits until `socket` accepts connections.
fn start_peer(cmd: &mut Command, socket: &Path) -> Peer {
    let mut peer = Peer(cmd.stdout(Stdio::null()).spawn().expect("start server"));
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(peer.0.try_wait().unwrap().is_none(), "{cmd:?} exited early");
        assert!(t.elapsed() < Duration::from_secs(20), "{cmd:?} not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    peer
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

#[test]
fn vhdtool_reads_maps_and_writes_through_an_export_of_vhdtool_serve() {
    if !tool_or_skip("nbdcopy") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let data = noise(1, MIB as usize);
    let image = vhdx_with(dir.path(), "a.vhdx", 16 * MIB, 5 * MIB, &data);
    let server = Served::start(dir.path(), &image, &[]);
    let uri = server.uri();

    let info = json(&vhdtool(&[&"info", &"--json", &uri]));
    assert_eq!(info["virtual-size"], 16 * MIB);
    assert_eq!(info["format"], "vhdx");
    assert!(info["actual-size"].is_null());
    assert!(
        info["uuid"].is_string(),
        "identity from the export description: {info}"
    );

    assert_eq!(read_uri(&uri, 5 * MIB, MIB), data);
    assert_eq!(read_uri(&uri, 0, 4096), vec![0u8; 4096]);
    // Block status: the one allocated 1 MiB block is data, the rest zeros.
    let map = json(&vhdtool(&[&"map", &"--json", &uri]));
    let data_runs: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data_runs, vec![(5 * MIB, MIB)]);

    // A write through the export, read back by an independent client.
    let patch = noise(2, 3 * 4096 + 100);
    let input = dir.path().join("patch");
    std::fs::write(&input, &patch).unwrap();
    ok(&vhdtool(&[
        &"write",
        &uri,
        &"--offset",
        &"8000",
        &"--input",
        &input,
    ]));
    let copy = dir.path().join("copy.raw");
    let out = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = std::fs::read(&copy).unwrap();
    assert_eq!(&all[8000..8000 + patch.len()], &patch[..]);
    assert_eq!(&all[5 * MIB as usize..6 * MIB as usize], &data[..]);
    assert_eq!(server.stop().code(), Some(0));
    ok(&vhdtool(&[&"check", &image]));
}

#[test]
fn vhdtool_reads_and_converts_a_qcow2_that_qemu_nbd_serves() {
    if !tool_or_skip("qemu-nbd") || !tool_or_skip("qemu-img") || !tool_or_skip("qemu-io") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let q = dir.path().join("q.qcow2");
    let qs = |args: &[&str]| {
        let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let qp = q.to_str().unwrap();
    qs(&["qemu-img", "create", "-f", "qcow2", qp, "32M"]);
    qs(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xa5 3M 192k",
        "-c",
        "write -P 0x3c 20M 4k",
        qp,
    ]);
    let socket = dir.path().join("q.sock");
    let peer = start_peer(
        Command::new("qemu-nbd")
            .args(["-t", "-r", "-f", "qcow2", "-k"])
            .arg(&socket)
            .arg(&q),
        &socket,
    );
    let uri = unix_uri(&socket);
    assert_eq!(read_uri(&uri, 3 * MIB, 192 << 10), vec![0xa5; 192 << 10]);
    assert_eq!(read_uri(&uri, 20 * MIB - 10, 20)[10..], [0x3c; 10]);
    let out = dir.path().join("out.vhdx");
    ok(&vhdtool(&[&"convert", &uri, &out]));
    drop(peer);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "vhdx"])
        .arg(&q)
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // Holes were skipped: only the two written regions' blocks are allocated.
    let info = json(&vhdtool(&[&"info", &"--json", &out]));
    assert!(info["actual-size"].as_u64().unwrap() < 8 * MIB, "{info}");
}

#[test]
fn convert_into_an_nbdkit_export_overwrites_old_data_and_nbdinfo_agrees_on_the_size() {
    if !tool_or_skip("nbdkit") || !tool_or_skip("nbdcopy") || !tool_or_skip("nbdinfo") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let data = noise(3, MIB as usize);
    let image = vhdx_with(dir.path(), "src.vhdx", 8 * MIB, 2 * MIB, &data);
    let socket = dir.path().join("k.sock");
    let _peer = start_peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", "8M"]),
        &socket,
    );
    let uri = unix_uri(&socket);
    let size = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    let info = json(&vhdtool(&[&"info", &"--json", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        info["virtual-size"].to_string()
    );
    // Old contents everywhere, written by another client.
    let junk = dir.path().join("junk.raw");
    std::fs::write(&junk, noise(4, 8 * MIB as usize)).unwrap();
    let o = Command::new("nbdcopy")
        .arg(&junk)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    ok(&vhdtool(&[&"convert", &image, &uri]));
    let back = dir.path().join("back.raw");
    let o = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&back)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut want = vec![0u8; 8 * MIB as usize];
    want[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&data);
    assert!(
        std::fs::read(&back).unwrap() == want,
        "export differs from the source"
    );
    // Compare agrees too, through the client.
    ok(&vhdtool(&[&"compare", &image, &uri]));
}

#[test]
fn child_over_an_nbd_parent_keeps_its_writes_local_and_the_parent_file_unchanged() {
    let dir = TempDir::new().unwrap();
    let data = noise(5, MIB as usize);
    let base = vhdx_with(dir.path(), "base.vhdx", 16 * MIB, 4 * MIB, &data);
    let before = std::fs::read(&base).unwrap();
    let server = Served::start(dir.path(), &base, &["--read-only"]);
    let uri = server.uri();
    let child = dir.path().join("child.vhdx");
    ok(&vhdtool(&[&"create", &"--parent", &uri, &child]));
    let info = json(&vhdtool(&[&"info", &"--json", &child]));
    let served = json(&vhdtool(&[&"info", &"--json", &uri]));
    assert_eq!(
        info["parent-uuid"], served["uuid"],
        "identity told by the server"
    );
    assert_eq!(info["parent"], uri.as_str());
    assert_eq!(info["backing-chain"][1], uri.as_str());

    let patch = noise(6, 64 << 10);
    let input = dir.path().join("patch");
    std::fs::write(&input, &patch).unwrap();
    let at = 4 * MIB + 1000;
    ok(&vhdtool(&[
        &"write",
        &child,
        &"--offset",
        &at.to_string(),
        &"--input",
        &input,
    ]));
    let mut want = data.clone();
    want[1000..1000 + patch.len()].copy_from_slice(&patch);
    let got = ok_bytes(&vhdtool(&[
        &"read",
        &child,
        &"--offset",
        &(4 * MIB).to_string(),
        &"--length",
        &MIB.to_string(),
    ]));
    assert!(got == want, "child reads parent bytes around its own");
    ok(&vhdtool(&[&"check", &child]));
    assert_eq!(server.stop().code(), Some(0));
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the parent file was written"
    );

    // Another image served under the same socket is refused as the parent.
    let other = vhdx_with(dir.path(), "base2.vhdx", 16 * MIB, 0, &data);
    std::fs::rename(&other, &base).unwrap();
    let server = Served::start(dir.path(), &base, &["--read-only"]);
    let e = fails(&vhdtool(&[
        &"read",
        &child,
        &"--offset",
        &"0",
        &"--length",
        &"512",
    ]));
    assert!(e.contains("UUID") && e.contains(&server.uri()), "{e}");
}

#[test]
fn create_refuses_an_export_that_tells_no_identity_as_a_parent() {
    if !tool_or_skip("nbdkit") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("k.sock");
    let _peer = start_peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", "8M"]),
        &socket,
    );
    let child = dir.path().join("child.vhdx");
    let e = fails(&vhdtool(&[
        &"create",
        &"--parent",
        &unix_uri(&socket),
        &child,
    ]));
    assert!(e.contains("no image identity"), "{e}");
    assert!(!child.exists());
}

#[test]
fn tls_export_is_read_with_the_ca_and_refused_without_it() {
    if !tool_or_skip("openssl") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let pki = dir.path().join("pki");
    make_pki(&pki);
    let data = noise(7, 4096);
    let image = vhdx_with(dir.path(), "t.vhdx", 4 * MIB, MIB, &data);
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let server = Served::start(
        dir.path(),
        &image,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let tls = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket.display(),
        pki.display()
    );
    assert_eq!(read_uri(&tls, MIB, 4096), data);
    let e = fails(&vhdtool(&[
        &"read",
        &server.uri(),
        &"--offset",
        &"0",
        &"--length",
        &"512",
    ]));
    assert!(e.contains("TLS required") && e.contains("nbds://"), "{e}");
    let e = fails(&vhdtool(&[
        &"read",
        &format!("nbds+unix:///?socket={}", server.socket.display()),
        &"--offset",
        &"0",
        &"--length",
        &"512",
    ]));
    assert!(e.contains("tls-certificates"), "{e}");
}

#[test]
fn read_from_a_server_that_stops_answering_times_out_naming_it() {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Greets, then reads whatever comes and never answers.
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut g = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        g.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&g).unwrap();
        let mut sink = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let uri = format!("nbd+unix:///?socket={}&timeout=1", socket.display());
    let started = Instant::now();
    let e = fails(&vhdtool(&[
        &"read",
        &uri,
        &"--offset",
        &"0",
        &"--length",
        &"512",
    ]));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(e.contains("no answer within") && e.contains(&uri), "{e}");
    t.join().unwrap();
}

fn ok_bytes(o: &std::process::Output) -> Vec<u8> {
    ok(o);
    o.stdout.clone()
}

#[test]
fn mount_of_an_export_serves_its_bytes_as_a_file() {
    let dir = TempDir::new().unwrap();
    let data = noise(8, MIB as usize);
    let image = vhdx_with(dir.path(), "m.vhdx", 8 * MIB, 3 * MIB, &data);
    let server = Served::start(dir.path(), &image, &["--read-only"]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(&vhdtool(&[&"mount", &"--read-only", &server.uri(), &mnt]));
    // The daemon forked from vhdtool uses the connection made before the fork: the parent
    // leaving must not have closed it.
    let disk = std::fs::read(mnt.join("disk"));
    ok(&vhdtool(&[&"umount", &mnt]));
    let disk = disk.unwrap();
    assert_eq!(disk.len() as u64, 8 * MIB);
    assert!(disk[3 * MIB as usize..4 * MIB as usize] == data[..]);
    assert_eq!(server.stop().code(), Some(0));
}
