//! `vhdtool serve` against independent NBD clients: nbdinfo, nbdcopy, qemu-img (QEMU's own NBD
//! client) and fio's nbd engine, on Unix sockets in temporary directories. Each test checks the
//! bytes against the source, and after SIGTERM that the server exited 0 and the image checks
//! clean.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use vhdkit_tests::noise as random_bytes;

use nbd::protocol::{cmd, errno};
use nbd::raw_client::RawClient;
use tempfile::TempDir;
use vhdkit_tests::tool_or_skip;

mod support;
use support::nbd_peer::{make_pki, Served};

const MIB: u64 = 1 << 20;

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn check_clean(image: &Path) {
    let out = vhdtool().arg("check").arg(image).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A dynamic VHDX of `size` with the bytes of `data` at each offset.
fn image_with(dir: &Path, name: &str, size: u64, data: &[(u64, Vec<u8>)]) -> PathBuf {
    let image = dir.join(name);
    run(vhdtool()
        .args(["create", "--type", "dynamic", "--block-size", "1M"])
        .arg(&image)
        .arg(size.to_string()));
    for (off, bytes) in data {
        let mut child = vhdtool()
            .arg("write")
            .arg(&image)
            .args(["--offset", &off.to_string(), "--input", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(child.wait().unwrap().success());
    }
    image
}

/// (offset, length, NBD block-status type) runs, neighbours of the same type merged.
fn merged(runs: impl Iterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (o, l, t) in runs {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

#[test]
fn nbdinfo_shows_the_size_and_the_map_vhdtool_map_shows() {
    if !tool_or_skip("nbdinfo") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let data = vec![
        (3 * MIB, random_bytes(1, 100_000)),
        (40 * MIB, random_bytes(2, 3 * MIB as usize)),
    ];
    let image = image_with(dir.path(), "m.vhdx", 64 * MIB, &data);
    let s = Served::start(dir.path(), &image, &["--read-only"]);
    let size = run(Command::new("nbdinfo").arg("--size").arg(s.uri()));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "67108864");
    let map = json(&run(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(s.uri())));
    let nbd_runs = merged(map.as_array().unwrap().iter().map(|e| {
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        )
    }));
    let ours = json(&run(vhdtool().args(["map", "--json"]).arg(&image)));
    let our_runs = merged(ours.as_array().unwrap().iter().map(|e| {
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let t = u64::from(!data) | if zero { 2 } else { 0 };
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            t,
        )
    }));
    assert_eq!(nbd_runs, our_runs);
    assert!(nbd_runs.len() >= 3, "{nbd_runs:?}");
    assert!(s.stop().success());
}

#[test]
fn nbdcopy_copies_into_the_export_and_back_out() {
    if !tool_or_skip("nbdcopy") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = image_with(dir.path(), "c.vhdx", 24 * MIB, &[]);
    let src = dir.path().join("src.raw");
    let mut bytes = random_bytes(3, (24 * MIB) as usize);
    bytes[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    std::fs::write(&src, &bytes).unwrap();
    let s = Served::start(dir.path(), &image, &[]);
    run(Command::new("nbdcopy").arg(&src).arg(s.uri()));
    let out = dir.path().join("out.raw");
    run(Command::new("nbdcopy").arg(s.uri()).arg(&out));
    assert!(std::fs::read(&out).unwrap() == bytes, "copied bytes differ");
    assert!(s.stop().success());
    check_clean(&image);
    run(vhdtool().arg("compare").arg(&src).arg(&image));
}

#[test]
fn qemu_img_reads_compares_and_converts_the_export() {
    if !tool_or_skip("qemu-img") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let data = vec![(MIB + 7, random_bytes(4, 2 * MIB as usize))];
    let image = image_with(dir.path(), "q.vhdx", 16 * MIB, &data);
    let raw = dir.path().join("q.raw");
    run(vhdtool()
        .args(["convert", "-O", "raw"])
        .arg(&image)
        .arg(&raw));
    let s = Served::start(dir.path(), &image, &["--read-only"]);
    let info = json(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(s.uri())));
    assert_eq!(info["virtual-size"].as_u64(), Some(16 * MIB));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(s.uri()));
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(s.uri())
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    assert!(s.stop().success());
}

#[test]
fn qemu_writes_into_a_differencing_child_and_the_parent_is_untouched() {
    if !tool_or_skip("qemu-img") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let base = image_with(
        dir.path(),
        "base.vhdx",
        16 * MIB,
        &[(0, random_bytes(5, 16 * MIB as usize))],
    );
    let child = dir.path().join("child.vhdx");
    run(vhdtool()
        .arg("create")
        .arg("--parent")
        .arg(&base)
        .arg(&child));
    let base_before = std::fs::read(&base).unwrap();
    let new = dir.path().join("new.raw");
    let mut bytes = random_bytes(6, (16 * MIB) as usize);
    bytes[..(2 * MIB) as usize].fill(0);
    std::fs::write(&new, &bytes).unwrap();
    let s = Served::start(dir.path(), &child, &[]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&new)
        .arg(s.uri()));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&new)
        .arg(s.uri()));
    assert!(s.stop().success());
    check_clean(&child);
    run(vhdtool().arg("compare").arg(&new).arg(&child));
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "parent written"
    );
}

#[test]
fn read_only_export_refuses_writes_and_never_writes_the_image() {
    if !tool_or_skip("nbdcopy") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = image_with(dir.path(), "r.vhdx", 8 * MIB, &[(0, random_bytes(7, 4096))]);
    let before = std::fs::read(&image).unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, random_bytes(8, (8 * MIB) as usize)).unwrap();
    let s = Served::start(dir.path(), &image, &["--read-only"]);
    let out = Command::new("nbdcopy")
        .arg(&src)
        .arg(s.uri())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a write to a read-only export worked"
    );
    let stream = UnixStream::connect(&s.socket).unwrap();
    let mut c = RawClient::handshake(stream, 3).unwrap();
    c.go("", false, false).unwrap();
    c.request(0, cmd::WRITE, 1, 0, 512, &[1u8; 512]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, errno::EPERM);
    assert!(s.stop().success());
    assert!(std::fs::read(&image).unwrap() == before, "image changed");
}

#[test]
fn fio_nbd_engine_verifies_its_random_writes() {
    if !tool_or_skip("fio") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = image_with(dir.path(), "f.vhdx", 16 * MIB, &[]);
    let s = Served::start(dir.path(), &image, &[]);
    let out = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
        ])
        .arg(format!("--uri={}", s.uri()))
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("engine nbd not loadable") {
        panic!("fio has no nbd engine here");
    }
    assert!(
        out.status.success(),
        "fio: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.stop().success());
    check_clean(&image);
}

#[test]
fn a_client_killed_mid_write_leaves_a_clean_image_with_its_flushed_writes() {
    if !tool_or_skip("nbdcopy") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = image_with(dir.path(), "k.vhdx", 64 * MIB, &[]);
    let s = Served::start(dir.path(), &image, &[]);
    // A flushed write, then a write cut off mid-payload by the client going away.
    let flushed = random_bytes(9, 256 << 10);
    let stream = UnixStream::connect(&s.socket).unwrap();
    let mut c = RawClient::handshake(stream, 3).unwrap();
    c.go("", true, false).unwrap();
    c.request(0, cmd::WRITE, 1, 5 * MIB, flushed.len() as u32, &flushed)
        .unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    c.request(0, cmd::FLUSH, 2, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    c.request(0, cmd::WRITE, 3, 20 * MIB, 1 << 20, &[0x5a; 300_000])
        .unwrap();
    drop(c);
    // And nbdcopy killed in the middle of a large copy.
    let src = dir.path().join("src.raw");
    std::fs::write(&src, random_bytes(10, (64 * MIB) as usize)).unwrap();
    let mut copy = Command::new("nbdcopy")
        .args(["--destination-is-zero"])
        .arg(&src)
        .arg(s.uri())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let _ = copy.kill();
    let _ = copy.wait();
    // The server goes on serving; what was flushed is there.
    let stream = UnixStream::connect(&s.socket).unwrap();
    let mut c = RawClient::handshake(stream, 3).unwrap();
    c.go("", false, false).unwrap();
    c.request(0, cmd::READ, 4, 20 * MIB, 4096, &[]).unwrap();
    let (e, _, d) = c.simple_reply(4096).unwrap();
    assert_eq!(e, 0);
    assert_ne!(d, vec![0x5a; 4096], "a write cut short was applied");
    drop(c);
    assert!(s.stop().success());
    check_clean(&image);
    let mut got = vec![0u8; flushed.len()];
    let out = run(vhdtool()
        .arg("read")
        .arg(&image)
        .args(["--offset", &(5 * MIB).to_string()])
        .args(["--length", &flushed.len().to_string()]));
    got.copy_from_slice(&out.stdout);
    // nbdcopy may have overwritten the range with its own bytes before it was killed.
    let theirs = &random_bytes(10, (64 * MIB) as usize)[(5 * MIB) as usize..][..flushed.len()];
    assert!(got == flushed || got == theirs, "flushed write lost");
}

#[test]
fn a_server_killed_after_a_flush_leaves_an_image_that_opens_with_the_flushed_data() {
    let dir = TempDir::new().unwrap();
    let image = image_with(dir.path(), "h.vhdx", 32 * MIB, &[]);
    let s = Served::start(dir.path(), &image, &[]);
    let flushed = random_bytes(11, 3 << 20);
    let stream = UnixStream::connect(&s.socket).unwrap();
    let mut c = RawClient::handshake(stream, 3).unwrap();
    c.go("", false, false).unwrap();
    c.request(
        0,
        cmd::WRITE,
        1,
        7 * MIB + 512,
        flushed.len() as u32,
        &flushed,
    )
    .unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    c.request(0, cmd::FLUSH, 2, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply(0).unwrap().0, 0);
    // More writes, not flushed, then the server dies.
    c.request(0, cmd::WRITE, 3, 20 * MIB, 1 << 20, &vec![3u8; 1 << 20])
        .unwrap();
    let _ = c.simple_reply(0);
    s.signal(libc::SIGKILL);
    drop(s);
    // Opens (a VHDX log left by the crash is replayed) and holds the flushed bytes.
    let out = vhdtool().arg("check").arg(&image).output().unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "check after SIGKILL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run(vhdtool()
        .arg("read")
        .arg(&image)
        .args(["--offset", &(7 * MIB + 512).to_string()])
        .args(["--length", &flushed.len().to_string()]));
    assert!(out.stdout == flushed, "flushed write lost");
}

#[test]
fn tls_is_required_when_certificates_are_given_and_client_certificates_are_checked() {
    if !tool_or_skip("openssl") || !tool_or_skip("nbdinfo") || !tool_or_skip("nbdcopy") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let pki = dir.path().join("pki");
    make_pki(&pki);
    let data = random_bytes(12, (4 * MIB) as usize);
    let image = image_with(dir.path(), "t.vhdx", 4 * MIB, &[(0, data.clone())]);
    let p = |f: &str| pki.join(f).display().to_string();
    let (cert, key, ca) = (p("server-cert.pem"), p("server-key.pem"), p("ca-cert.pem"));
    let s = Served::start(
        dir.path(),
        &image,
        &[
            "--read-only",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ],
    );
    let tls_uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s.socket.display(),
        pki.display()
    );
    let info = run(Command::new("nbdinfo").arg(&tls_uri));
    assert!(String::from_utf8_lossy(&info.stdout).contains("with TLS"));
    let out = dir.path().join("out.raw");
    run(Command::new("nbdcopy").arg(&tls_uri).arg(&out));
    assert!(std::fs::read(&out).unwrap() == data);
    // Without TLS nothing is told about the export.
    let plain = Command::new("nbdinfo").arg(s.uri()).output().unwrap();
    assert!(!plain.status.success());
    // With TLS but no client certificate: refused.
    let nocert = dir.path().join("nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let anon = Command::new("nbdinfo")
        .arg(format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            s.socket.display(),
            nocert.display()
        ))
        .output()
        .unwrap();
    assert!(
        !anon.status.success(),
        "a client without a certificate got in"
    );
    assert!(s.stop().success());
}

#[test]
fn a_client_vanishing_while_read_replies_are_sent_does_not_stop_the_server() {
    let dir = TempDir::new().unwrap();
    let data = random_bytes(11, (32 * MIB) as usize);
    let image = image_with(dir.path(), "r.vhdx", 64 * MIB, &[(0, data.clone())]);
    let s = Served::start(dir.path(), &image, &[]);
    for round in 0..20 {
        // Ask for 32 MiB in 1 MiB reads and leave without reading the replies: the server's
        // writes then fail with EPIPE (or, were SIGPIPE not ignored, kill it).
        let stream = UnixStream::connect(&s.socket).unwrap();
        let mut c = RawClient::handshake(stream, 3).unwrap();
        c.go("", false, false).unwrap();
        for i in 0..32u64 {
            c.request(0, cmd::READ, i, i * MIB, MIB as u32, &[])
                .unwrap();
        }
        if round % 2 == 1 {
            let _ = c.simple_reply(MIB as usize);
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    let stream = UnixStream::connect(&s.socket).expect("server still listening");
    let mut c = RawClient::handshake(stream, 3).unwrap();
    c.go("", false, false).unwrap();
    c.request(0, cmd::READ, 1, 3 * MIB, 4096, &[]).unwrap();
    let (e, _, d) = c.simple_reply(4096).unwrap();
    assert_eq!(e, 0);
    assert_eq!(d, data[(3 * MIB) as usize..][..4096]);
    drop(c);
    assert!(
        s.stop().success(),
        "the server did not exit 0 after SIGTERM"
    );
}
