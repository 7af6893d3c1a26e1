//! NBD peers for the end-to-end tests: a running `vhdtool serve` and a TLS PKI for it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn vhdtool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdtool"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `vhdtool serve`; killed on drop if still running.
pub struct Served {
    /// The server process.
    pub child: Child,
    /// Its Unix socket.
    pub socket: PathBuf,
}

impl Served {
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Served {
        let socket = dir.join(format!(
            "s{}.sock",
            image.file_name().unwrap().to_string_lossy()
        ));
        let child = vhdtool()
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .args(extra)
            .arg(image)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vhdtool serve");
        let mut s = Served { child, socket };
        let t = Instant::now();
        while UnixStream::connect(&s.socket).is_err() {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("vhdtool serve exited early: {st}");
            }
            assert!(t.elapsed() < Duration::from_secs(20), "server not up");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let st = self.child.wait().unwrap();
        assert!(!self.socket.exists(), "socket left behind");
        st
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A CA, a server certificate for localhost and a client certificate, made with openssl, in
/// `dir` under the names libnbd's `tls-certificates` directory uses.
pub fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("ext.cnf"),
        "[srv]\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n\
         [cli]\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let ossl = |args: &[&str]| {
        run(Command::new("openssl").current_dir(dir).args(args));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    ossl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
            ],
        ]
        .concat(),
    );
    for (who, ext) in [("server", "srv"), ("client", "cli")] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        ossl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"],
            ]
            .concat(),
        );
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-extensions",
            ext,
        ]);
    }
}
