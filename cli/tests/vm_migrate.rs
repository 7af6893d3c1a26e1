//! Live migration of a tiny guest on the machine's own `/dev/kvm`: `vhdtool vm migrate` from
//! a `vhdtool boot --api-socket` to a `vhdtool boot --incoming` (the guest's letter sequence
//! goes on at the target, the source exits 0, the disk is clean), and against fake peers
//! written here: a target that hangs up part way (before and after the disks were released)
//! or runs another version, and a source of another version. The guest keeps running at the
//! source whenever the migration fails.
//!
//! Without a usable `/dev/kvm` these tests print SKIP and pass, except under `CI=true`.

use std::io::BufReader;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use vmm::migration::stream::{encode_header, Receiver, Record, Sender, PROTOCOL_VERSION};

mod support;
use support::vm_process::{dynamic_vhdx, kvm_or_skip, next_letter, Vmm};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

impl Vmm {
    /// The letters guest over `disk`, once it printed 3 letters.
    fn source(dir: &Path, disk: &Path) -> Vmm {
        Vmm::letters(dir, "src.sock", disk, 3)
    }

    /// `boot --incoming` on a free port; returns it with its `tcp:HOST:PORT`.
    fn target(dir: &Path) -> (Vmm, String) {
        let vm = Vmm::spawn(
            dir.join("dst.sock"),
            &["--incoming".as_ref(), "tcp:127.0.0.1:0".as_ref()],
        );
        let uri = vm.wait_for_stderr("waiting for a migration on ");
        (vm, uri)
    }

    fn shutdown(self) -> String {
        let o = self.vm(&["shutdown", "--timeout", "0"]);
        assert!(o.status.success(), "{o:?}");
        let (code, err, _) = self.wait();
        assert_eq!(code, Some(0), "{err}");
        err
    }
}

/// Migrates `src` to a new target in `dir`; checks that the source exited 0 and that the
/// target goes on with the next letter; returns the target, its `vm status --json` and what
/// `migrate` printed.
fn migrate(dir: &Path, src: Vmm) -> (Vmm, serde_json::Value, String) {
    let (dst, uri) = Vmm::target(dir);
    let start = Instant::now();
    let o = src.vm(&["migrate", &uri]);
    let took = start.elapsed();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{o:?}");
    println!("migrate: {said}");
    println!("migrate command took {:.1} ms", took.as_secs_f64() * 1e3);
    let (code, err, before) = src.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("guest migrated"), "{err}");
    dst.wait_for_output(3);
    let after = dst.out.lock().unwrap().clone();
    assert_eq!(
        after[0],
        next_letter(*before.last().unwrap()),
        "the target did not continue where the source stopped: {:?} then {:?}",
        String::from_utf8_lossy(&before),
        String::from_utf8_lossy(&after)
    );
    assert_sequence(&after);
    let v: serde_json::Value =
        serde_json::from_slice(&dst.vm(&["status", "--json"]).stdout).unwrap();
    assert_eq!(v["state"], "running");
    (dst, v, said)
}

fn assert_sequence(out: &[u8]) {
    for w in out.windows(2) {
        assert_eq!(
            w[1],
            next_letter(w[0]),
            "sequence broken: {}",
            String::from_utf8_lossy(out)
        );
    }
}

fn assert_clean(disk: &Path) {
    let o = vhdtool().arg("check").arg(disk).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

#[test]
fn a_running_guest_moves_to_the_incoming_vmm_and_its_sequence_goes_on_there() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let src = Vmm::source(dir.path(), &disk);
    let (dst, v, said) = migrate(dir.path(), src);
    assert!(
        said.contains("migrated to") && said.contains("guest paused"),
        "{said}"
    );
    assert_eq!(v["memory"], 128u64 << 20);
    assert_eq!(v["disks"][0]["path"], disk.to_str().unwrap());
    dst.shutdown();
    assert_clean(&disk);
}

#[test]
fn a_guest_checkpointed_while_running_then_migrates_on_its_new_child() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let src = Vmm::source(dir.path(), &disk);
    let ckpt = dir.path().join("ckpt");
    let said = src.ok(&["checkpoint", ckpt.to_str().unwrap()]);
    assert!(said.contains("checkpoint in"), "{said}");
    let (dst, v, _) = migrate(dir.path(), src);
    let on = v["disks"][0]["path"].as_str().unwrap().to_string();
    assert!(
        on.ends_with(".avhdx"),
        "the target is not on the checkpoint's child: {on}"
    );
    dst.shutdown();
    assert_clean(Path::new(&on));
}

/// `vhdtool serve --unix` of `disk` until dropped (SIGTERM, then the exit is awaited).
struct Served(std::process::Child);

impl Served {
    fn start(dir: &Path, disk: &Path) -> (Served, String) {
        let sock = dir.join("nbd.sock");
        let child = vhdtool()
            .arg("serve")
            .arg("--unix")
            .arg(&sock)
            .arg(disk)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed().as_secs() < 30, "serve did not listen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (
            Served(child),
            format!("nbd+unix:///?socket={}", sock.display()),
        )
    }

    /// Stops the server and returns its exit code.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill(2) on the server's own pid, which we have not reaped yet.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        self.0.wait().unwrap().code()
    }
}

#[test]
fn a_guest_on_an_nbd_export_migrates_and_the_target_reconnects_to_it() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let (server, uri) = Served::start(dir.path(), &disk);
    let src = Vmm::source(dir.path(), Path::new(&uri));
    let (dst, v, _) = migrate(dir.path(), src);
    assert_eq!(v["disks"][0]["path"], uri.as_str(), "{v}");
    dst.shutdown();
    assert_eq!(server.stop(), Some(0), "serve did not end cleanly");
    assert_clean(&disk);
}

/// How a fake target misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Hangs up after this many records.
    HangUpAfter(u64),
    /// Hangs up once the disks were released (the source must reopen them).
    HangUpAtDisksReleased,
    /// Answers with another vhdtool version.
    OtherVersion,
    /// Reports a failure of its own once the disks were released.
    FailsAtDisksReleased,
}

/// A fake target on a free port: returns its `tcp:` address.
fn fake_target(how: Fake) -> (String, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        let mut tx = Sender::new(conn.try_clone().unwrap(), "source");
        let mut rx = Receiver::new(BufReader::new(conn), "source");
        if let Fake::OtherVersion = how {
            let mut w = conn_writer(&mut tx);
            std::io::Write::write_all(&mut w, &encode_header(PROTOCOL_VERSION, "0.0.0-other"))
                .unwrap();
            return format!("{:?}", rx.header().map(|_| ()).and_then(|()| rx.record()));
        }
        tx.header().unwrap();
        rx.header().unwrap();
        loop {
            let r = rx.record();
            match (how, &r) {
                (Fake::HangUpAfter(n), Ok(_)) if rx.records > n => {
                    return format!("hung up after {} records, {} bytes", rx.records, rx.offset)
                }
                (Fake::HangUpAtDisksReleased, Ok(Record::DisksReleased)) => {
                    return format!("hung up at disks released, {} bytes", rx.offset)
                }
                (Fake::FailsAtDisksReleased, Ok(Record::DisksReleased)) => {
                    tx.send(&Record::Failed("cannot open the disk (test)".into()))
                        .unwrap();
                    return format!("{:?}", rx.record());
                }
                (_, Ok(_)) => {}
                (_, Err(e)) => return format!("stream ended: {e}"),
            }
        }
    });
    (uri, h)
}

fn conn_writer(tx: &mut Sender<std::net::TcpStream>) -> std::net::TcpStream {
    tx.get_ref().try_clone().unwrap()
}

#[test]
fn a_migration_cut_part_way_leaves_the_guest_running_at_the_source() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dynamic_vhdx(dir.path());
    let src = Vmm::source(dir.path(), &disk);
    for (how, want) in [
        (Fake::HangUpAfter(3), "migration"),
        (Fake::HangUpAtDisksReleased, "migration"),
        (Fake::OtherVersion, "0.0.0-other"),
        (
            Fake::FailsAtDisksReleased,
            "failed: cannot open the disk (test)",
        ),
    ] {
        let (uri, fake) = fake_target(how);
        let o = src.vm(&["migrate", &uri]);
        let said = fake.join().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        println!("{how:?}: target {said}; migrate: {err}");
        assert!(!o.status.success(), "{how:?}: {o:?}");
        assert!(
            err.contains(&uri) && err.contains(want) && err.contains("runs on here"),
            "{how:?}: {err}"
        );
        // The guest goes on, in sequence, at the source.
        let v: serde_json::Value =
            serde_json::from_slice(&src.vm(&["status", "--json"]).stdout).unwrap();
        assert_eq!(v["state"], "running", "{how:?}");
        let n = src.printed.load(Ordering::SeqCst);
        src.wait_for_output(n + 3);
    }
    assert_sequence(&src.out.lock().unwrap());
    // The disk was reopened and is flushed and clean at the end.
    src.shutdown();
    assert_clean(&disk);
}

#[test]
fn an_incoming_vmm_refuses_a_source_of_another_version_clearly() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (dst, uri) = Vmm::target(dir.path());
    let addr = uri.strip_prefix("tcp:").unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut conn, &encode_header(PROTOCOL_VERSION + 1, "9.9.9")).unwrap();
    let (code, err, _) = dst.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("refused") && err.contains("protocol 2") && err.contains("tcp:127.0.0.1"),
        "{err}"
    );
    // The source is told why.
    let mut rx = Receiver::new(BufReader::new(conn), "target");
    let said = rx
        .header()
        .map(|_| ())
        .and_then(|()| rx.record().map(|_| ()));
    assert!(
        format!("{said:?}").contains("protocol"),
        "the target did not say why: {said:?}"
    );
}
