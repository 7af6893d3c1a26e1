//! The metadata region: disk parameters and the parent locator, read with bounds checks.

use crate::error::{Error, Result};
use crate::format::{
    guids, metadata_entry_offset, parse_metadata_table, read_padded, FileParameters, Guid,
    ParentLocator, BLOCK_SIZE_RANGE, KIB64, MAX_VIRTUAL_SIZE, TABLE_SIZE,
};
use crate::image::VhdxImage;
use image_io::ImageFile;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use zerocopy::byteorder::little_endian::{U32, U64};

/// Parameters from the metadata items.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskParams {
    /// Bytes per payload block (1 MiB to 256 MiB, power of two).
    pub block_size: u32,
    /// Fixed images: blocks stay allocated.
    pub leave_blocks_allocated: bool,
    /// Differencing image.
    pub has_parent: bool,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// SCSI page 83 identifier.
    pub page83: Uuid,
}

/// What a differencing image records about its parent.
#[derive(Debug, Clone)]
pub struct ParentLink {
    /// `parent_linkage`: the parent's DataWriteGuid.
    pub linkage: Uuid,
    /// `parent_linkage2`, an alternative accepted linkage.
    pub linkage2: Option<Uuid>,
    /// All key/value pairs as stored.
    pub entries: Vec<(String, String)>,
    /// Candidate parent paths in resolution order: relative_path (against the child's
    /// directory), absolute_win32_path, volume_path, then each one's file name beside the child.
    pub candidates: Vec<PathBuf>,
}

impl ParentLink {
    /// Whether a parent with DataWriteGuid `guid` is the one this child was made from.
    pub fn matches(&self, guid: Uuid) -> bool {
        self.linkage == guid || self.linkage2 == Some(guid)
    }
}

fn parse_guid_text(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

/// Maps a stored Windows path to a host path: `\\?\` prefixes dropped, `\` -> `/`, a leading
/// `.\` dropped.
fn host_path(s: &str) -> PathBuf {
    let s = s.strip_prefix("\\\\?\\").unwrap_or(s);
    let s = s.replace('\\', "/");
    PathBuf::from(s.strip_prefix("./").unwrap_or(&s))
}

/// Whether a stored locator value is a URI (`scheme://...`, scheme letters, digits, `+`, `-`,
/// `.`) rather than a path: a Windows path has at most a drive letter before its colon.
fn is_uri(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        scheme.len() > 1
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

fn base_name(s: &str) -> &str {
    s.rsplit(['\\', '/']).next().unwrap_or(s)
}

impl ParentLink {
    pub(crate) fn from_locator(
        loc: &ParentLocator,
        child: &Path,
    ) -> std::result::Result<ParentLink, String> {
        let linkage = loc
            .get("parent_linkage")
            .ok_or("no parent_linkage key")
            .and_then(|v| parse_guid_text(v).ok_or("parent_linkage is not a GUID"))?;
        let linkage2 = loc.get("parent_linkage2").and_then(parse_guid_text);
        let dir = child.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut candidates: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !candidates.contains(&p) {
                candidates.push(p);
            }
        };
        let keys = ["relative_path", "absolute_win32_path", "volume_path"];
        for key in keys {
            if let Some(v) = loc.get(key).filter(|v| is_uri(v)) {
                // A parent reached over the network (`nbd://...`): the URI as stored.
                push(PathBuf::from(v));
            }
        }
        let keys = keys.map(|k| (k, loc.get(k).filter(|v| !is_uri(v))));
        for (key, v) in keys {
            if let Some(v) = v {
                let p = host_path(v);
                if key == "relative_path" || p.is_relative() {
                    if key != "volume_path" {
                        push(dir.join(p));
                    }
                } else {
                    push(p);
                }
            }
        }
        for (_, v) in keys {
            if let Some(v) = v {
                push(dir.join(base_name(v)));
            }
        }
        Ok(ParentLink {
            linkage,
            linkage2,
            entries: loc.entries.clone(),
            candidates,
        })
    }
}

/// Reads and validates the metadata table and items.
pub(crate) fn read_metadata<F: ImageFile>(
    img: &VhdxImage<F>,
) -> Result<(DiskParams, Option<ParentLink>)> {
    let r = img.regions();
    let path = img.path();
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        path: path.into(),
        structure: "metadata",
        offset,
        reason,
    };
    let mut table = vec![0u8; TABLE_SIZE];
    img.read_file_at(&mut table, r.metadata_offset)?;
    let entries = parse_metadata_table(&table).ok_or_else(|| {
        corrupt(
            r.metadata_offset,
            "bad metadata table signature or entry count".into(),
        )
    })?;
    let mut params = DiskParams::default();
    let mut found = [false; 5];
    let mut locator = None;
    for (i, e) in entries.iter().enumerate() {
        let entry_at = r.metadata_offset + metadata_entry_offset(i);
        let end = e.offset as u64 + e.length as u64;
        if e.length > (1 << 20)
            || (e.length > 0 && ((e.offset as u64) < KIB64 || end > r.metadata_length))
        {
            return Err(corrupt(
                entry_at,
                format!(
                    "item {} at {:#x} (+{}) lies outside the metadata region",
                    e.item_id, e.offset, e.length
                ),
            ));
        }
        let mut data = vec![0u8; e.length as usize];
        img.read_file_at(&mut data, r.metadata_offset + e.offset as u64)?;
        let need = |n: usize| {
            if data.len() < n {
                Err(corrupt(
                    entry_at,
                    format!("item {} is {} bytes, expected {n}", e.item_id, data.len()),
                ))
            } else {
                Ok(())
            }
        };
        match e.item_id {
            id if id == guids::FILE_PARAMETERS => {
                need(size_of::<FileParameters>())?;
                let fp: FileParameters = read_padded(&data);
                params.block_size = fp.block_size.get();
                let flags = fp.flags.get();
                params.leave_blocks_allocated = flags & 1 != 0;
                params.has_parent = flags & 2 != 0;
                found[0] = true;
            }
            id if id == guids::VIRTUAL_DISK_SIZE => {
                need(8)?;
                params.virtual_size = read_padded::<U64>(&data).get();
                found[1] = true;
            }
            id if id == guids::PAGE_83_DATA => {
                need(16)?;
                params.page83 = read_padded::<Guid>(&data).get();
            }
            id if id == guids::LOGICAL_SECTOR_SIZE => {
                need(4)?;
                params.logical_sector_size = read_padded::<U32>(&data).get();
                found[2] = true;
            }
            id if id == guids::PHYSICAL_SECTOR_SIZE => {
                need(4)?;
                params.physical_sector_size = read_padded::<U32>(&data).get();
                found[3] = true;
            }
            id if id == guids::PARENT_LOCATOR => {
                let loc = ParentLocator::parse(&data)
                    .map_err(|reason| corrupt(entry_at, format!("parent locator: {reason}")))?;
                locator = Some(loc);
                found[4] = true;
            }
            id if e.is_required => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    what: format!("required metadata item {id} is unknown"),
                });
            }
            _ => {}
        }
    }
    let at = r.metadata_offset;
    for (i, name) in [
        "File Parameters",
        "Virtual Disk Size",
        "Logical Sector Size",
        "Physical Sector Size",
    ]
    .iter()
    .enumerate()
    {
        if !found[i] {
            return Err(corrupt(at, format!("required item {name} is missing")));
        }
    }
    if !params.block_size.is_power_of_two() || !BLOCK_SIZE_RANGE.contains(&params.block_size) {
        return Err(corrupt(
            at,
            format!(
                "block size {} is not a power of two from 1 MiB to 256 MiB",
                params.block_size
            ),
        ));
    }
    for (name, v) in [
        ("logical", params.logical_sector_size),
        ("physical", params.physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(corrupt(
                at,
                format!("{name} sector size {v} is neither 512 nor 4096"),
            ));
        }
    }
    let v = params.virtual_size;
    if v == 0 || v > MAX_VIRTUAL_SIZE || v % params.logical_sector_size as u64 != 0 {
        return Err(corrupt(at, format!("virtual size {v} is zero, above 64 TiB, or not a multiple of the logical sector size")));
    }
    let parent = if params.has_parent {
        let loc = locator
            .ok_or_else(|| corrupt(at, "differencing image without a parent locator".into()))?;
        if loc.locator_type != guids::PARENT_LOCATOR_TYPE {
            return Err(Error::Unsupported {
                path: path.into(),
                what: format!("parent locator type {}", loc.locator_type),
            });
        }
        Some(
            ParentLink::from_locator(&loc, path)
                .map_err(|reason| corrupt(at, format!("parent locator: {reason}")))?,
        )
    } else {
        None
    };
    Ok((params, parent))
}
