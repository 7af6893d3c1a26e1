//! Every verb that writes to stdout ends quietly when its reader goes away (`| head`, `| grep
//! -q`): killed by SIGPIPE or exit 0, never a panic ("failed printing to stdout") or exit 101.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn verbs_end_quietly_when_the_reader_of_stdout_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("x.vhd");
    let vhdx = dir.path().join("x.vhdx");
    let data = dir.path().join("data");
    std::fs::write(
        &data,
        (0..4u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    for img in [&vhd, &vhdx] {
        let run = |args: &[&std::ffi::OsStr]| {
            let o = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
        };
        run(&[
            "create".as_ref(),
            "--type".as_ref(),
            "dynamic".as_ref(),
            img.as_os_str(),
            "256M".as_ref(),
        ]);
        for off in ["0", "64M", "200M"] {
            run(&[
                "write".as_ref(),
                img.as_os_str(),
                "--offset".as_ref(),
                off.as_ref(),
                "--input".as_ref(),
                data.as_os_str(),
            ]);
        }
    }
    let (v, x) = (vhd.to_str().unwrap(), vhdx.to_str().unwrap());
    let verbs: Vec<Vec<&str>> = vec![
        vec!["info", "--json", v],
        vec!["info", x],
        vec!["map", v],
        vec!["map", "--json", x],
        vec!["read", x, "--offset", "0", "--length", "64M"],
        vec!["check", "--json", v],
        vec!["check", x],
        vec!["compare", "--json", v, x],
        vec!["measure", "-O", "vhdx", "--json", v],
        vec!["completions", "bash"],
        vec!["man"],
        vec!["--help"],
    ];
    let tries = 1000;
    for i in 0..tries {
        let args = &verbs[i % verbs.len()];
        let mut child = Command::new(env!("CARGO_BIN_EXE_vhdtool"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        // Go away at once, or after the first few bytes.
        if i % 2 == 1 {
            let mut b = [0u8; 16];
            let _ = out.read(&mut b);
        }
        drop(out);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
            "try {i}: vhdtool {args:?} ended with {}: {err}",
            o.status
        );
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "try {i}: {args:?}: {err}"
        );
    }
}
