//! Putting a finished output file in place: outputs (new images, conversions) are written under
//! a temporary name beside their destination, synced, then given their name, so a crash or a
//! failure never leaves a half-written file under the name a user asked for.
//!
//! Invariants:
//! - Without `replace`, an existing destination is never overwritten: `link(2)` refuses it
//!   atomically (on file systems without hard links: checked, then renamed).
//! - The new name is durable once [`publish`] returns: the directory is synced.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// This process's temporary name beside `dst`: `.NAME.vhdkit-tmp-PID` in `dst`'s directory.
pub fn temp_name(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(dst).join(format!(".{name}.vhdkit-tmp-{}", std::process::id()))
}

/// Makes the entries of `dir` durable (best effort: some file systems cannot sync directories).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Names the finished (already synced) file `tmp` as `dst` and syncs the directory. With
/// `replace` an existing `dst` is replaced; without, an existing `dst` is an
/// [`io::ErrorKind::AlreadyExists`] error and `tmp` is left for the caller to remove.
pub fn publish(tmp: &Path, dst: &Path, replace: bool) -> io::Result<()> {
    if replace {
        std::fs::rename(tmp, dst)?;
    } else {
        match std::fs::hard_link(tmp, dst) {
            Ok(()) => {
                let _ = std::fs::remove_file(tmp);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {
                // File systems without hard links: check, then rename.
                if dst.symlink_metadata().is_ok() {
                    return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                }
                std::fs::rename(tmp, dst)?;
            }
        }
    }
    sync_dir(&parent_dir(dst));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_never_overwrites_without_replace() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("out.img");
        let tmp = temp_name(&dst);
        assert_eq!(tmp.parent(), Some(d.path()));
        std::fs::write(&tmp, b"new").unwrap();
        std::fs::write(&dst, b"old").unwrap();
        let e = publish(&tmp, &dst, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&dst).unwrap(), b"old");
        publish(&tmp, &dst, true).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"new");
        assert!(!tmp.exists());
    }

    #[test]
    fn publish_names_a_new_file_and_removes_the_temporary_name() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("fresh.img");
        let tmp = temp_name(&dst);
        std::fs::write(&tmp, b"data").unwrap();
        publish(&tmp, &dst, false).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"data");
        assert!(!tmp.exists());
    }
}
