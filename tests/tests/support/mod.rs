//! Shared by the hostile-input suite and the kill loops: running `vhdtool` as a bounded process,
//! and the on-disk offsets of VHD and VHDX structures (parsed here, independently of the format
//! crates, so damage is placed by the specification rather than by the code under test).

#![allow(dead_code)] // each test file uses its own part

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
pub use vhdkit_tests::noise as pattern;

/// Longest a `vhdtool` run may take on any input.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Address-space limit of a `vhdtool` run (`ulimit -v`).
pub const MEMORY_LIMIT: u64 = 4 << 30;

/// How a bounded run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal that ended it, if any.
    pub signal: Option<i32>,
    /// Killed for running past [`TIMEOUT`].
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// Problems that are bugs whatever the input: a panic, a signal, a hang.
    pub fn misbehaviour(&self) -> Option<String> {
        if self.timed_out {
            Some(format!("still running after {TIMEOUT:?} (killed)"))
        } else if let Some(sig) = self.signal {
            Some(format!("killed by signal {sig}"))
        } else if self.code == Some(101) || self.stderr.contains("panicked") {
            Some("panicked".into())
        } else {
            None
        }
    }
}

/// Runs `cmd` under the memory limit and the timeout, capturing its output. The limit is set by
/// `prlimit` when it is installed (the child is then spawned without a fork of this process,
/// which holds every case's bytes), else by `setrlimit` between fork and exec.
pub fn run_bounded(cmd: Command) -> Outcome {
    let mut cmd = if vhdkit_tests::have_tool("prlimit") {
        let mut p = Command::new("prlimit");
        p.arg(format!("--as={MEMORY_LIMIT}"))
            .arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        p
    } else {
        let mut cmd = cmd;
        // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: MEMORY_LIMIT,
                    rlim_max: MEMORY_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn vhdtool");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let (status, timed_out) = wait_until(&mut child, started + TIMEOUT);
    Outcome {
        code: status.code(),
        signal: if timed_out { None } else { status.signal() },
        timed_out,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        elapsed: started.elapsed(),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Waits for `child`, killing it at `deadline`. Returns its status and whether it was killed.
pub fn wait_until(child: &mut Child, deadline: Instant) -> (std::process::ExitStatus, bool) {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("wait after kill"), true);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `vhdtool <args>` as a bounded run.
pub fn vhdtool_bounded<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    let bin = vhdkit_tests::vhdtool_bin();
    for _ in 0..10 {
        let mut cmd = Command::new(&bin);
        cmd.args(args);
        let o = run_bounded(cmd);
        // prlimit could not start the binary: it is being rebuilt by a concurrent cargo run
        // (the workspace is shared); wait for it.
        if o.code == Some(127) && o.stderr.contains("prlimit: failed to execute") {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        return o;
    }
    panic!("cannot run {}", bin.display());
}

/// `vhdtool <args>`, which must succeed.
pub fn vhdtool_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let o = vhdtool_bounded(args);
    assert_eq!(
        o.code,
        Some(0),
        "vhdtool {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        o.stderr
    );
    o.stdout
}

/// Writes `data` at `offset` of the disk at `image` through `vhdtool write`.
pub fn vhdtool_write(image: &Path, offset: u64, data: &[u8]) {
    let input = image.with_extension("input");
    std::fs::write(&input, data).unwrap();
    vhdtool_ok(&[
        OsStr::new("write"),
        image.as_os_str(),
        OsStr::new("--offset"),
        OsStr::new(&offset.to_string()),
        OsStr::new("--input"),
        input.as_os_str(),
    ]);
    std::fs::remove_file(input).unwrap();
}

// ---------------------------------------------------------------------------------------------
// VHD (big-endian). Footer: 512 bytes at the end (and a copy at 0 for dynamic/differencing).
// Dynamic header: 1024 bytes at the footer's data offset.

pub mod vhd {
    /// Footer field offsets.
    pub const F_DATA_OFFSET: usize = 16;
    pub const F_ORIGINAL_SIZE: usize = 40;
    pub const F_CURRENT_SIZE: usize = 48;
    pub const F_GEOMETRY: usize = 56;
    pub const F_DISK_TYPE: usize = 60;
    pub const F_CHECKSUM: usize = 64;
    pub const F_UUID: usize = 68;
    /// Dynamic header field offsets.
    pub const H_DATA_OFFSET: usize = 8;
    pub const H_TABLE_OFFSET: usize = 16;
    pub const H_VERSION: usize = 24;
    pub const H_MAX_ENTRIES: usize = 28;
    pub const H_BLOCK_SIZE: usize = 32;
    pub const H_CHECKSUM: usize = 36;
    pub const H_PARENT_UUID: usize = 40;
    pub const H_PARENT_NAME: usize = 64;
    pub const H_LOCATORS: usize = 576;

    pub fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }
    pub fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// One's complement of the byte sum, with the checksum field taken as zero.
    pub fn seal(b: &mut [u8], at: usize, len: usize, checksum_at: usize) {
        b[at + checksum_at..at + checksum_at + 4].fill(0);
        let sum: u32 = b[at..at + len]
            .iter()
            .fold(0u32, |s, &x| s.wrapping_add(x as u32));
        b[at + checksum_at..at + checksum_at + 4].copy_from_slice(&(!sum).to_be_bytes());
    }

    /// A parent locator entry.
    #[derive(Debug, Clone, Copy)]
    pub struct Locator {
        pub entry_at: usize,
        pub code: u32,
        pub space: u32,
        pub length: u32,
        pub data_offset: u64,
    }

    /// Where the structures of a VHD file are.
    #[derive(Debug, Clone)]
    pub struct Layout {
        pub len: usize,
        pub footer: usize,
        pub dynamic: bool,
        pub header: usize,
        pub bat: usize,
        pub entries: usize,
        pub block_size: u64,
        pub locators: Vec<Locator>,
    }

    impl Layout {
        pub fn of(b: &[u8]) -> Layout {
            let len = b.len();
            let footer = len - 512;
            let dynamic = matches!(be32(b, footer + F_DISK_TYPE), 3 | 4);
            let mut l = Layout {
                len,
                footer,
                dynamic,
                header: 0,
                bat: 0,
                entries: 0,
                block_size: 0,
                locators: vec![],
            };
            if dynamic {
                l.header = be64(b, footer + F_DATA_OFFSET) as usize;
                let h = l.header;
                l.bat = be64(b, h + H_TABLE_OFFSET) as usize;
                l.entries = be32(b, h + H_MAX_ENTRIES) as usize;
                l.block_size = be32(b, h + H_BLOCK_SIZE) as u64;
                for i in 0..8 {
                    let e = h + H_LOCATORS + 24 * i;
                    let code = be32(b, e);
                    if code != 0 {
                        l.locators.push(Locator {
                            entry_at: e,
                            code,
                            space: be32(b, e + 4),
                            length: be32(b, e + 8),
                            data_offset: be64(b, e + 16),
                        });
                    }
                }
            }
            l
        }

        /// Sets a footer field in every footer copy and re-seals them.
        pub fn set_footer(&self, b: &mut [u8], field: usize, value: &[u8]) {
            let mut copies = vec![self.footer];
            if self.dynamic {
                copies.push(0);
            }
            for at in copies {
                b[at + field..at + field + value.len()].copy_from_slice(value);
                seal(b, at, 512, F_CHECKSUM);
            }
        }

        /// Sets a dynamic-header field and re-seals the header.
        pub fn set_header(&self, b: &mut [u8], field: usize, value: &[u8]) {
            b[self.header + field..self.header + field + value.len()].copy_from_slice(value);
            seal(b, self.header, 1024, H_CHECKSUM);
        }

        /// File offset of BAT entry `i`.
        pub fn bat_entry(&self, i: usize) -> usize {
            self.bat + 4 * i
        }

        /// Index and sector of the first allocated block.
        pub fn first_allocated(&self, b: &[u8]) -> Option<(usize, u32)> {
            (0..self.entries)
                .map(|i| (i, be32(b, self.bat_entry(i))))
                .find(|&(_, e)| e != u32::MAX)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VHDX (little-endian, CRC-32C).

pub mod vhdx {
    pub const HEADERS: [usize; 2] = [64 << 10, 128 << 10];
    pub const REGIONS: [usize; 2] = [192 << 10, 256 << 10];
    /// Header field offsets.
    pub const H_SEQUENCE: usize = 8;
    pub const H_FILE_WRITE_GUID: usize = 16;
    pub const H_DATA_WRITE_GUID: usize = 32;
    pub const H_LOG_GUID: usize = 48;
    pub const H_LOG_VERSION: usize = 64;
    pub const H_VERSION: usize = 66;
    pub const H_LOG_LENGTH: usize = 68;
    pub const H_LOG_OFFSET: usize = 72;
    /// Region table: entry count at 8, entries of 32 bytes from 16 (GUID, offset u64, length
    /// u32, required u32).
    pub const R_COUNT: usize = 8;

    pub const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
    pub const METADATA_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
    pub const FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
    pub const VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
    pub const LOGICAL_SECTOR_SIZE: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
    pub const PHYSICAL_SECTOR_SIZE: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
    pub const PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";

    pub fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    pub fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    pub fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// GUID text to on-disk bytes (first three fields little-endian).
    pub fn guid(text: &str) -> [u8; 16] {
        let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let mut raw = [0u8; 16];
        for (i, r) in raw.iter_mut().enumerate() {
            *r = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        let mut b = raw;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    /// On-disk GUID bytes to the `{xxxxxxxx-...}` text a parent_linkage value holds (lower case,
    /// as vhdkit writes it).
    pub fn guid_text(b: &[u8]) -> String {
        let mut r = [0u8; 16];
        r.copy_from_slice(&b[..16]);
        r[0..4].reverse();
        r[4..6].reverse();
        r[6..8].reverse();
        let h: Vec<String> = r.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{{{}-{}-{}-{}-{}}}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }

    /// CRC-32C of `b[at..at+len]` with its checksum (at `at + 4`) zeroed, stored there.
    pub fn seal(b: &mut [u8], at: usize, len: usize) {
        b[at + 4..at + 8].fill(0);
        let crc = crc32c::crc32c(&b[at..at + len]);
        b[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// A metadata item.
    #[derive(Debug, Clone, Copy)]
    pub struct Item {
        pub entry_at: usize,
        pub at: usize,
        pub len: usize,
    }

    /// Where the structures of a VHDX file are.
    #[derive(Debug, Clone)]
    pub struct Layout {
        pub len: usize,
        /// Index (0/1) of the header with the larger sequence number.
        pub current: usize,
        pub log_offset: usize,
        pub log_length: usize,
        pub bat: usize,
        pub bat_len: usize,
        pub metadata: usize,
        pub items: Vec<([u8; 16], Item)>,
    }

    impl Layout {
        pub fn of(b: &[u8]) -> Layout {
            let seq = |i: usize| le64(b, HEADERS[i] + H_SEQUENCE);
            let current = if seq(1) > seq(0) { 1 } else { 0 };
            let h = HEADERS[current];
            let mut l = Layout {
                len: b.len(),
                current,
                log_offset: le64(b, h + H_LOG_OFFSET) as usize,
                log_length: le32(b, h + H_LOG_LENGTH) as usize,
                bat: 0,
                bat_len: 0,
                metadata: 0,
                items: vec![],
            };
            let r = REGIONS[0];
            for i in 0..le32(b, r + R_COUNT) as usize {
                let e = r + 16 + 32 * i;
                let (off, len) = (le64(b, e + 16) as usize, le32(b, e + 24) as usize);
                if b[e..e + 16] == guid(BAT_GUID) {
                    (l.bat, l.bat_len) = (off, len);
                } else if b[e..e + 16] == guid(METADATA_GUID) {
                    l.metadata = off;
                }
            }
            let m = l.metadata;
            for i in 0..le16(b, m + 10) as usize {
                let e = m + 32 + 32 * i;
                let mut id = [0u8; 16];
                id.copy_from_slice(&b[e..e + 16]);
                let item = Item {
                    entry_at: e,
                    at: m + le32(b, e + 16) as usize,
                    len: le32(b, e + 20) as usize,
                };
                l.items.push((id, item));
            }
            l
        }

        pub fn item(&self, id: &str) -> Option<Item> {
            let g = guid(id);
            self.items.iter().find(|(i, _)| *i == g).map(|(_, it)| *it)
        }

        /// Sets a field in both headers and re-seals them.
        pub fn set_header(&self, b: &mut [u8], field: usize, value: &[u8]) {
            for h in HEADERS {
                b[h + field..h + field + value.len()].copy_from_slice(value);
                seal(b, h, 4096);
            }
        }

        /// Sets bytes in both region tables and re-seals them.
        pub fn set_regions(&self, b: &mut [u8], field: usize, value: &[u8]) {
            for r in REGIONS {
                b[r + field..r + field + value.len()].copy_from_slice(value);
                seal(b, r, 64 << 10);
            }
        }

        /// Offset of the region-table entry for `id` within a table.
        pub fn region_entry(&self, b: &[u8], id: &str) -> usize {
            let r = REGIONS[0];
            (0..le32(b, r + R_COUNT) as usize)
                .map(|i| 16 + 32 * i)
                .find(|&e| b[r + e..r + e + 16] == guid(id))
                .expect("region present")
        }
    }
}
