//! Image locking: one writer or many readers per image, across processes, compatible with QEMU.
//!
//! Two processes writing one dynamic image both allocate the same free space and lose each
//! other's BAT updates, and a reader of an image being written sees torn metadata. So every
//! path-based open of an image takes a lock first, and a conflicting open is refused at once
//! (never waited for) with [`InUse`].
//!
//! The locks are QEMU's (`file-posix`, `locking=auto`), so vhdtool, qemu, qemu-img and qemu-nbd
//! refuse each other too. Open-file-description (OFD) byte-range locks, all of them shared
//! (read) locks of one byte, in two rows of permission bytes:
//!
//! ```text
//!   byte 100 + i   "I hold permission i"          i: 0 consistent read   2 write unchanged
//!   byte 200 + i   "I do not share permission i"     1 write             3 resize
//!
//!   mode                     holds bytes           refused while another holds
//!   ReadOnly                 100, 201, 203         101 or 103 (a writer), 200
//!   ReadOnlyForceShare       100                   200
//!   ReadWrite                100, 101, 103,        200, 201, 203 (a reader or writer),
//!                            201, 203              101, 103 (a writer)
//! ```
//!
//! A conflict is found by asking whether an exclusive lock could be taken on the other row's
//! byte (`F_OFD_GETLK`): only another open file description's shared lock stands in the way,
//! never our own. The locks are applied first and checked afterwards, so two processes opening
//! at the same instant cannot both miss each other (both may be refused; neither runs unlocked).
//! A conflict is looked at again for up to 100 ms before it counts: a description closed by its
//! owner can live on for a moment in a child process between `fork` and `exec`.
//!
//! Invariants:
//! - The lock lives as long as the returned `File` (closing the description releases it);
//!   opening the same image twice in one process counts as two users, like two processes.
//! - File systems without OFD locks (`EINVAL`, `ENOLCK`, `EOPNOTSUPP`) open unlocked, as QEMU's
//!   `locking=auto` does; any other failure to lock is an error.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// How an image is opened, and what it lets other processes do with the image meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Never writes. Other readers are welcome; writers are refused, and the open is refused
    /// while another process writes the image.
    ReadOnly,
    /// Never writes and stands in nobody's way (qemu-img's `--force-share`): for inspecting an
    /// image in use. Its data and metadata may change while it is read.
    ReadOnlyForceShare,
    /// Reads and writes; refused while any other process has the image open (but
    /// [`OpenMode::ReadOnlyForceShare`] readers), and refuses them in turn.
    ReadWrite,
}

impl OpenMode {
    /// Whether this mode writes.
    pub fn is_writable(self) -> bool {
        self == OpenMode::ReadWrite
    }

    /// The mode of a differencing image's parents: read-only, sharing as this one does.
    pub fn for_parent(self) -> OpenMode {
        match self {
            OpenMode::ReadOnlyForceShare => OpenMode::ReadOnlyForceShare,
            _ => OpenMode::ReadOnly,
        }
    }

    /// (permissions held, permissions not shared), as bit masks of [`PERMS`].
    fn masks(self) -> (u8, u8) {
        match self {
            OpenMode::ReadOnly => (READ, WRITE | RESIZE),
            OpenMode::ReadOnlyForceShare => (READ, 0),
            OpenMode::ReadWrite => (READ | WRITE | RESIZE, WRITE | RESIZE),
        }
    }
}

const READ: u8 = 1;
const WRITE: u8 = 2;
const RESIZE: u8 = 8;

/// QEMU's permission names, bit `i` of a mask being `PERMS[i]`.
const PERMS: [&str; 5] = [
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "graph modification",
];
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// The image is in use by another process in a way this open cannot share.
#[derive(Debug)]
pub struct InUse {
    /// The image.
    pub path: PathBuf,
    /// How it was to be opened.
    pub mode: OpenMode,
    /// The permission in conflict (QEMU's name: "write", "consistent read", ...).
    pub permission: &'static str,
    /// Whether the other process holds `permission` (true) or refuses to share it (false).
    pub held_by_other: bool,
}

impl fmt::Display for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (doing, verb) = match self.permission {
            "consistent read" => ("reading", "read"),
            "resize" => ("resizing", "resize"),
            _ => ("writing", "write"),
        };
        write!(
            f,
            "{}: image is in use: another process (vhdtool, qemu, ...) ",
            self.path.display()
        )?;
        if self.held_by_other {
            write!(
                f,
                "has it open for {doing} (failed to get the shared \"{}\" lock)",
                self.permission
            )?;
        } else {
            write!(
                f,
                "has it open and lets no one else {verb} it (failed to get the \"{}\" lock)",
                self.permission
            )?;
        }
        match self.mode {
            OpenMode::ReadOnly => f.write_str(
                "; --force-share reads it anyway, but its data may change while it is read",
            ),
            OpenMode::ReadWrite => f.write_str("; close it there first"),
            OpenMode::ReadOnlyForceShare => Ok(()),
        }
    }
}

impl std::error::Error for InUse {}

/// Why [`open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// The file could not be opened or locked.
    Io(io::Error),
    /// Another process uses the image.
    InUse(InUse),
}

/// Opens the image at `path` (`O_RDONLY`, or `O_RDWR` for [`OpenMode::ReadWrite`]) and locks it
/// for `mode`. The lock is released when the returned file is closed.
pub fn open(path: &Path, mode: OpenMode) -> Result<File, OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(mode.is_writable())
        .open(path)
        .map_err(OpenError::Io)?;
    lock(&file, path, mode)?;
    Ok(file)
}

/// Locks an open image file for `mode` (see the module docs); `path` names it in the error.
pub fn lock(file: &File, path: &Path, mode: OpenMode) -> Result<(), OpenError> {
    let (held, unshared) = mode.masks();
    for (i, _) in PERMS.iter().enumerate() {
        let bit = 1u8 << i;
        for (mask, base) in [(held, PERM_BASE), (unshared, SHARED_BASE)] {
            if mask & bit != 0 {
                match set_read_lock(file, base + i as i64) {
                    Ok(()) => {}
                    Err(e) if unsupported(&e) => return Ok(()),
                    Err(e) if busy(&e) => {
                        // Someone holds an exclusive lock on our byte: not QEMU's scheme, but
                        // certainly a user of the image.
                        return Err(in_use(path, mode, i, base == PERM_BASE));
                    }
                    Err(e) => return Err(OpenError::Io(e)),
                }
            }
        }
    }
    // A conflict seen for a moment may be a lock already released: a file description
    // outlives its `close` while a child process forked meanwhile (by any thread) has not yet
    // reached `exec`, or while a closed io_uring still holds its registered files. So a
    // conflict is looked at again a few times over 100 ms before it counts.
    let mut tries = 0;
    loop {
        match conflict(file, held, unshared)? {
            None => return Ok(()),
            Some((i, other_holds)) if tries == RECHECKS => {
                return Err(in_use(path, mode, i, other_holds));
            }
            Some(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// How many times a conflict is looked at again (20 ms apart) before it counts.
const RECHECKS: u32 = 5;

/// The first permission in conflict with another description's locks: `(permission, whether
/// the other holds it)`. What we hold must not be unshared by another; what we do not share
/// must not be held by another.
fn conflict(file: &File, held: u8, unshared: u8) -> Result<Option<(usize, bool)>, OpenError> {
    for (i, _) in PERMS.iter().enumerate() {
        let bit = 1u8 << i;
        for (mask, other_base, other_holds) in
            [(held, SHARED_BASE, false), (unshared, PERM_BASE, true)]
        {
            if mask & bit != 0 && locked_by_other(file, other_base + i as i64)? {
                return Ok(Some((i, other_holds)));
            }
        }
    }
    Ok(None)
}

fn in_use(path: &Path, mode: OpenMode, perm: usize, held_by_other: bool) -> OpenError {
    OpenError::InUse(InUse {
        path: path.into(),
        mode,
        permission: PERMS[perm],
        held_by_other,
    })
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
    )
}

fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

fn flock_at(kind: libc::c_int, byte: i64) -> libc::flock {
    #[allow(unsafe_code)]
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_read_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(libc::F_RDLCK, byte);
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is open for the call (borrowed from `file`) and `fl` is a valid
    // `flock` the kernel only reads.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds a lock on `byte` (our own never conflict).
fn locked_by_other(file: &File, byte: i64) -> Result<bool, OpenError> {
    let mut fl = flock_at(libc::F_WRLCK, byte);
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is open for the call and `fl` is a valid `flock` the kernel
    // overwrites in place with the first conflicting lock, if any.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) {
            Ok(false)
        } else {
            Err(OpenError::Io(e))
        };
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        (d, p)
    }

    fn refused(first: OpenMode, second: OpenMode) -> bool {
        let (_d, p) = image();
        let _a = open(&p, first).unwrap_or_else(|_| panic!("first open {first:?}"));
        matches!(open(&p, second), Err(OpenError::InUse(_)))
    }

    #[test]
    fn a_second_writer_is_refused() {
        assert!(refused(OpenMode::ReadWrite, OpenMode::ReadWrite));
    }

    #[test]
    fn readers_and_writers_refuse_each_other() {
        assert!(refused(OpenMode::ReadWrite, OpenMode::ReadOnly));
        assert!(refused(OpenMode::ReadOnly, OpenMode::ReadWrite));
    }

    #[test]
    fn readers_share_an_image() {
        assert!(!refused(OpenMode::ReadOnly, OpenMode::ReadOnly));
    }

    #[test]
    fn force_share_reads_beside_a_writer_without_blocking_it() {
        assert!(!refused(OpenMode::ReadWrite, OpenMode::ReadOnlyForceShare));
        assert!(!refused(OpenMode::ReadOnlyForceShare, OpenMode::ReadWrite));
    }

    #[test]
    fn closing_the_file_releases_the_lock() {
        let (_d, p) = image();
        drop(open(&p, OpenMode::ReadWrite).unwrap());
        assert!(open(&p, OpenMode::ReadWrite).is_ok());
    }

    #[test]
    fn the_refusal_names_the_image_and_the_flag_that_reads_anyway() {
        let (_d, p) = image();
        let _w = open(&p, OpenMode::ReadWrite).unwrap();
        let Err(OpenError::InUse(e)) = open(&p, OpenMode::ReadOnly) else {
            panic!("not refused");
        };
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(
            msg.contains("in use") && msg.contains("--force-share"),
            "{msg}"
        );
    }
}
