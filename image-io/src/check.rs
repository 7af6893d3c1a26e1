//! What `check` reports, in the vocabulary every format shares.
//!
//! A report sorts what a format's check found into three kinds, following qemu-img's exit codes:
//! - **corruptions** (exit 2): data may be read wrongly or the image cannot be used;
//! - **leaks** (exit 3): file space `repair` or `compact` can give back, no harm to data;
//! - **unused** space: free file space that is part of the creator's layout or that nothing in
//!   place can reclaim. Information only, never counted in the exit code.
//!
//! Findings name the structure and its byte offset in the file, so that a user can look at it.

use serde::Serialize;

use crate::ImageError;

/// One problem a check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Structure concerned (`"footer"`, `"BAT"`, `"parent link"`, ...).
    pub structure: String,
    /// Byte offset of the structure in the file.
    pub offset: u64,
    /// What is wrong, with the full error text.
    pub message: String,
}

impl From<&ImageError> for Finding {
    /// The finding for an error a check met: the structure and offset it names (`"file"` for
    /// an I/O error, `"image"` for an error that names no structure), and its full text.
    fn from(e: &ImageError) -> Finding {
        let (structure, offset) = match e {
            ImageError::Corrupt {
                structure, offset, ..
            }
            | ImageError::Checksum {
                structure, offset, ..
            } => (structure.to_string(), *offset),
            ImageError::Io { offset, .. } => ("file".into(), *offset),
            _ => ("image".into(), 0),
        };
        Finding {
            structure,
            offset,
            message: e.to_string(),
        }
    }
}

/// A free file range that is not a leak (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Unused {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether `compact` gives it back (moves blocks into it or cuts it off).
    pub compact_releases: bool,
    /// Where it is, why it is there, what releases it.
    pub message: String,
}

/// The result of a format's check or repair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that can make data read wrongly or the image unusable.
    pub corruptions: Vec<Finding>,
    /// File space `repair` or `compact` can give back.
    pub leaks: Vec<Finding>,
    /// Total leaked bytes.
    pub leaked_bytes: u64,
    /// Free file space that is no leak: information, not a finding.
    pub unused: Vec<Unused>,
    /// What a repair did.
    pub repairs: Vec<String>,
}

impl CheckReport {
    /// qemu-img's convention: 0 clean, 2 corruption, 3 only leaks.
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }

    /// Whether nothing was found (unused space is no finding).
    pub fn is_clean(&self) -> bool {
        self.corruptions.is_empty() && self.leaks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding() -> Finding {
        Finding {
            structure: "BAT".into(),
            offset: 3 << 20,
            message: "entry 7 points past the end".into(),
        }
    }

    #[test]
    fn corruption_outranks_leaks_and_unused_space_counts_for_nothing() {
        let mut r = CheckReport {
            unused: vec![Unused {
                offset: 1 << 20,
                length: 4 << 20,
                compact_releases: false,
                message: "reserve".into(),
            }],
            ..CheckReport::default()
        };
        assert_eq!((r.exit_code(), r.is_clean()), (0, true));
        r.leaks.push(finding());
        assert_eq!((r.exit_code(), r.is_clean()), (3, false));
        r.corruptions.push(finding());
        assert_eq!(r.exit_code(), 2);
    }
}
