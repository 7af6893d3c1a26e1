//! Azure test support: an Azurite Blob service of the test's own (on a free port, own data
//! folder, telemetry off) and Microsoft's JS SDK (`@azure/storage-blob`) as the independent
//! client, both from `.ci/node/node_modules` (`.ci/install-node-packages`, run by `./setup.sh`
//! and `.ci/run`).
//!
//! ```text
//!   test ──Azurite::start_or_skip──> azurite-blob --blobPort <free> --location <scratch>
//!        ──sdk(["sas", ..])────────> node tests/azure/sdk.js  (container, SAS, ranges, download)
//! ```
//!
//! Invariants:
//! - Each [`Azurite`] is its own process and folder; dropping it kills the process.
//! - A missing node, Azurite or SDK skips the test ([`crate::skipped`]), or fails it under
//!   `CI=true`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{ci, fresh_scratch_dir, have_tool, skipped, workspace_root};

/// The emulator's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";

fn node_modules() -> PathBuf {
    workspace_root().join(".ci/node/node_modules")
}

fn sdk_script() -> PathBuf {
    workspace_root().join("tests/azure/sdk.js")
}

/// Why Azurite or the SDK cannot run here, if so.
fn missing() -> Option<String> {
    if !have_tool("node") {
        return Some("node not found on PATH (apt-get install nodejs npm)".into());
    }
    let m = node_modules();
    if !m.join(".bin/azurite-blob").exists() || !m.join("@azure/storage-blob").is_dir() {
        return Some(format!(
            "Azurite or @azure/storage-blob missing from {} (run .ci/install-node-packages)",
            m.display()
        ));
    }
    None
}

/// A running Azurite Blob service, killed on drop.
pub struct Azurite {
    child: Option<Child>,
    port: u16,
}

impl Azurite {
    /// Starts Azurite, or skips (returns `None`) when it is not installed; under `CI=true` a
    /// missing Azurite panics.
    pub fn start_or_skip() -> Option<Azurite> {
        if let Some(why) = missing() {
            if ci() {
                panic!("{why} (CI=true requires it)");
            }
            skipped(&why);
            return None;
        }
        let mut last = String::new();
        for _ in 0..3 {
            match Azurite::try_start() {
                Ok(a) => return Some(a),
                Err(e) => last = e,
            }
        }
        panic!("Azurite did not start: {last}");
    }

    fn try_start() -> Result<Azurite, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let dir = fresh_scratch_dir();
        let child = Command::new(node_modules().join(".bin/azurite-blob"))
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&dir)
            .args(["--silent", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run azurite-blob: {e}"))?;
        let mut a = Azurite {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(st))) = a.child.as_mut().map(Child::try_wait) {
                return Err(format!("azurite-blob exited: {st}"));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(a);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("azurite-blob did not listen within 30 s".into())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Creates a container (through the SDK).
    pub fn container(&self, name: &str) {
        sdk_ok(&["container", &self.endpoint(), name]);
    }

    /// A blob URL with a SAS of permissions `perms` (`racwd`...) valid for `secs` seconds
    /// (negative: expired already), made by the SDK.
    pub fn sas_url(&self, container: &str, blob: &str, perms: &str, secs: i64) -> String {
        sdk_ok(&[
            "sas",
            &self.endpoint(),
            container,
            blob,
            perms,
            &secs.to_string(),
        ])
        .trim()
        .to_string()
    }

    /// Kills the service (a network cut for the clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `node tests/azure/sdk.js ARGS` (the JS SDK), whatever its exit status.
pub fn sdk(args: &[&str]) -> Output {
    Command::new("node")
        .arg(sdk_script())
        .args(args)
        .env("NODE_PATH", node_modules())
        .output()
        .unwrap_or_else(|e| panic!("cannot run node: {e}"))
}

/// [`sdk`], requiring success; returns stdout.
pub fn sdk_ok(args: &[&str]) -> String {
    let out = sdk(args);
    assert!(
        out.status.success(),
        "sdk.js {} failed: {}",
        args.first().copied().unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("sdk.js prints UTF-8")
}
