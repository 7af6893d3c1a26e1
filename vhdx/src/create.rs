//! Creating VHDX images: fixed, dynamic and differencing, 512- or 4096-byte sectors.
//!
//! Layout (what Hyper-V writes, modulo order): identifier, two headers, two region tables, log at
//! 1 MiB (1 MiB long), metadata region at 2 MiB, BAT at 3 MiB, payload blocks after it. Defaults
//! follow Hyper-V: dynamic, 32 MiB blocks (2 MiB for differencing children), 512-byte logical
//! and 4096-byte physical sectors. Unwritten blocks of a dynamic image are marked ZERO (so every
//! reader returns zeros, where NOT_PRESENT would strictly be "undefined"); a fixed image has
//! every block FULLY_PRESENT in a fully written file (Windows refuses sparse ones) unless
//! `sparse` is asked for.

use crate::error::{Error, Result};
use crate::format::{
    bat_bytes, guids, metadata_table_bytes, state, BatEntry, FileIdentifier, FileParameters,
    Header, MetadataEntry, ParentLocator, RegionEntry, RegionTable, BLOCK_SIZE_RANGE,
    HEADER_OFFSETS, HEADER_SIGNATURE, KIB64, MAX_VIRTUAL_SIZE, MIB, REGION_OFFSETS,
};
use crate::image::{io, OpenMode, VhdxImage};
use image_io::ImageFile;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use zerocopy::IntoBytes;

/// Default block size of dynamic and fixed images (Hyper-V's).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// Default block size of differencing images.
pub const DEFAULT_CHILD_BLOCK_SIZE: u32 = 2 << 20;

/// Options for [`VhdxImage::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size (ignored with a parent).
    pub size: u64,
    /// Fixed (all blocks allocated) instead of dynamic; ignored with a parent.
    pub fixed: bool,
    /// Block size; `None` for the default.
    pub block_size: Option<u32>,
    /// 512 or 4096 (ignored with a parent: the parent's is used).
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Fixed only: leave the data area sparse.
    pub sparse: bool,
    /// Parent image: makes a differencing image. Opened read-only.
    pub parent: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            fixed: false,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            sparse: false,
            parent: None,
        }
    }
}

/// What a child records about its parent.
#[derive(Debug, Clone)]
pub struct ParentInfo {
    /// Absolute path of the parent.
    pub absolute: PathBuf,
    /// Path of the parent relative to the child's directory, Windows style.
    pub relative: String,
    /// The parent's DataWriteGuid.
    pub data_write_guid: Uuid,
    /// The parent's virtual size.
    pub virtual_size: u64,
    /// The parent's logical sector size.
    pub logical_sector_size: u32,
    /// The parent's page 83 identifier (children share it).
    pub page83: Uuid,
}

impl ParentInfo {
    /// A parent reached through a URI (a network export) rather than a path, described by the
    /// caller: the child's locator stores the URI verbatim as `absolute_win32_path` and no
    /// `relative_path`, and the page 83 identifier is new.
    pub fn remote(
        uri: &str,
        data_write_guid: Uuid,
        virtual_size: u64,
        logical_sector_size: u32,
    ) -> ParentInfo {
        ParentInfo {
            absolute: PathBuf::from(uri),
            relative: String::new(),
            data_write_guid,
            virtual_size,
            logical_sector_size,
            page83: Uuid::new_v4(),
        }
    }

    /// Whether this parent is reached through a URI ([`ParentInfo::remote`]).
    fn is_remote(&self) -> bool {
        self.relative.is_empty()
    }
}

impl ParentInfo {
    /// Reads a VHDX parent for a child to be created in `child_dir`.
    pub fn read(parent: &Path, child_dir: &Path) -> Result<ParentInfo> {
        let img = VhdxImage::open(parent, OpenMode::ReadOnly)?;
        let absolute =
            std::fs::canonicalize(parent).map_err(io(parent, "resolve parent path", 0))?;
        let dir =
            std::fs::canonicalize(child_dir).map_err(io(child_dir, "resolve directory", 0))?;
        Ok(ParentInfo {
            relative: relative_windows_path(&dir, &absolute),
            absolute,
            data_write_guid: img.header().data_write_guid,
            virtual_size: img.virtual_size(),
            logical_sector_size: img.logical_sector_size(),
            page83: img.params().page83,
        })
    }
}

use image_io::format::relative_windows_path;

impl VhdxImage<std::fs::File> {
    /// Creates an image at `path` (which must not exist) through a temporary name, and opens
    /// it read-write.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Self> {
        Self::create_with(path, opts, None)
    }

    /// Creates a differencing image at `path` over a parent the caller describes (one reached
    /// through a URI: [`ParentInfo::remote`]); `opts.parent` is ignored.
    pub fn create_over(path: &Path, opts: &CreateOptions, parent: ParentInfo) -> Result<Self> {
        Self::create_with(path, opts, Some(parent))
    }

    fn create_with(
        path: &Path,
        opts: &CreateOptions,
        described: Option<ParentInfo>,
    ) -> Result<Self> {
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} already exists",
                path.display()
            )));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent = match (described, &opts.parent) {
            (Some(d), _) => Some(d),
            (None, Some(p)) => Some(ParentInfo::read(p, &dir)?),
            (None, None) => None,
        };
        let tmp = image_io::publish::temp_name(path);
        let result = (|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io(&tmp, "create", 0))?;
            write_layout(&file, &tmp, opts, parent.as_ref())?;
            image_io::publish::publish(&tmp, path, false).map_err(io(path, "rename into place", 0))
        })();
        let _ = std::fs::remove_file(&tmp);
        result?;
        VhdxImage::open(path, OpenMode::ReadWrite)
    }
}

impl<F: ImageFile> VhdxImage<F> {
    /// Writes a new image into the empty `file` and opens it read-write.
    pub fn create_in(
        file: F,
        path: &Path,
        opts: &CreateOptions,
        parent: Option<&ParentInfo>,
    ) -> Result<Self> {
        write_layout(&file, path, opts, parent)?;
        VhdxImage::open_file(file, path, OpenMode::ReadWrite)
    }
}

/// Validates the options and writes every structure of a new image.
fn write_layout<F: ImageFile>(
    file: &F,
    path: &Path,
    opts: &CreateOptions,
    parent: Option<&ParentInfo>,
) -> Result<()> {
    let (size, lss) = match parent {
        Some(p) => (p.virtual_size, p.logical_sector_size),
        None => (opts.size, opts.logical_sector_size),
    };
    let fixed = opts.fixed && parent.is_none();
    let bs = opts.block_size.unwrap_or(if parent.is_some() {
        DEFAULT_CHILD_BLOCK_SIZE
    } else {
        DEFAULT_BLOCK_SIZE
    });
    let pss = opts.physical_sector_size;
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if lss != 512 && lss != 4096 {
        return bad(format!("logical sector size {lss} must be 512 or 4096"));
    }
    if pss != 512 && pss != 4096 {
        return bad(format!("physical sector size {pss} must be 512 or 4096"));
    }
    if !bs.is_power_of_two() || !BLOCK_SIZE_RANGE.contains(&bs) {
        return bad(format!(
            "block size {bs} must be a power of two from 1 MiB to 256 MiB"
        ));
    }
    if size == 0 || size % lss as u64 != 0 || size > MAX_VIRTUAL_SIZE {
        return bad(format!(
            "virtual size {size} must be a positive multiple of {lss} bytes, at most 64 TiB"
        ));
    }
    let w = |buf: &[u8], at: u64, op: &'static str| {
        file.write_all_at(buf, at).map_err(io(path, op, at))
    };

    // File type identifier.
    let mut ident = vec![0u8; KIB64 as usize];
    let id = FileIdentifier::new(&format!("vhdkit {}", env!("CARGO_PKG_VERSION")));
    ident[..size_of::<FileIdentifier>()].copy_from_slice(id.as_bytes());
    w(&ident, 0, "write file identifier")?;

    // Headers: both valid, the second current.
    let (fw, dw) = (Uuid::new_v4(), Uuid::new_v4());
    for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
        let h = Header {
            signature: HEADER_SIGNATURE,
            checksum: 0,
            sequence_number: i as u64 + 1,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        w(&h.to_bytes(), at, "write header")?;
    }

    // Geometry of the BAT.
    let chunk_ratio = (1u64 << 23) * lss as u64 / bs as u64;
    let blocks = size.div_ceil(bs as u64);
    let entries = if parent.is_some() {
        blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else {
        blocks + (blocks - 1) / chunk_ratio
    };
    let (meta_at, bat_at) = (2 * MIB, 3 * MIB);
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let bat_len32 =
        u32::try_from(bat_len).map_err(|_| Error::InvalidArgument("BAT too large".into()))?;
    let regions = RegionTable {
        signature: 0,
        checksum: 0,
        entries: vec![
            RegionEntry {
                guid: guids::BAT_REGION,
                file_offset: bat_at,
                length: bat_len32,
                required: true,
            },
            RegionEntry {
                guid: guids::METADATA_REGION,
                file_offset: meta_at,
                length: MIB as u32,
                required: true,
            },
        ],
    };
    for at in REGION_OFFSETS {
        w(&regions.to_bytes(), at, "write region table")?;
    }

    // Metadata items, packed from 64 KiB.
    let mut items: Vec<(uuid::Uuid, Vec<u8>, bool)> = Vec::new();
    let fp = FileParameters {
        block_size: bs.into(),
        flags: (fixed as u32 | (parent.is_some() as u32) << 1).into(),
    };
    items.push((guids::FILE_PARAMETERS, fp.as_bytes().to_vec(), false));
    items.push((guids::VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), true));
    let page83 = parent.map_or_else(Uuid::new_v4, |p| p.page83);
    items.push((guids::PAGE_83_DATA, page83.to_bytes_le().to_vec(), true));
    items.push((guids::LOGICAL_SECTOR_SIZE, lss.to_le_bytes().to_vec(), true));
    items.push((
        guids::PHYSICAL_SECTOR_SIZE,
        pss.to_le_bytes().to_vec(),
        true,
    ));
    if let Some(p) = parent {
        let linkage = (
            "parent_linkage".into(),
            format!("{{{}}}", p.data_write_guid),
        );
        let entries = if p.is_remote() {
            // The URI as it is: readers find it by its scheme.
            vec![
                linkage,
                (
                    "absolute_win32_path".into(),
                    p.absolute.to_string_lossy().into(),
                ),
            ]
        } else {
            vec![
                linkage,
                ("relative_path".into(), p.relative.clone()),
                // Backslash separators, as Windows writes: readers that keep what follows the
                // last backslash (libvhdi) then find the parent beside the child; we map back.
                (
                    "absolute_win32_path".into(),
                    p.absolute.to_string_lossy().replace('/', "\\"),
                ),
            ]
        };
        let loc = ParentLocator {
            locator_type: guids::PARENT_LOCATOR_TYPE,
            entries,
        };
        items.push((guids::PARENT_LOCATOR, loc.to_bytes(), false));
    }
    let mut entries_md = Vec::new();
    let mut off = KIB64 as u32;
    for (id, data, virtual_disk) in &items {
        w(data, meta_at + off as u64, "write metadata item")?;
        entries_md.push(MetadataEntry {
            item_id: *id,
            offset: off,
            length: data.len() as u32,
            is_user: false,
            is_virtual_disk: *virtual_disk,
            is_required: true,
        });
        off += data.len() as u32;
    }
    w(
        &metadata_table_bytes(&entries_md),
        meta_at,
        "write metadata table",
    )?;

    // BAT and payload.
    let data_at = bat_at + bat_len;
    let mut bat = vec![BatEntry::default(); entries as usize];
    let mut end = data_at;
    for b in 0..blocks {
        let idx = (b + b / chunk_ratio) as usize;
        let e = if fixed {
            BatEntry::new(state::FULLY_PRESENT, data_at + b * bs as u64)
        } else if parent.is_some() {
            BatEntry::new(state::NOT_PRESENT, 0)
        } else {
            BatEntry::new(state::ZERO, 0)
        };
        bat[idx] = e;
    }
    w(&bat_bytes(&bat), bat_at, "write BAT")?;
    if fixed {
        end = data_at + blocks * bs as u64;
        if !opts.sparse {
            let zeros = vec![0u8; MIB as usize];
            let mut at = data_at;
            while at < end {
                w(&zeros, at, "preallocate")?;
                at += MIB;
            }
        }
    }
    file.set_len(end.max(data_at))
        .map_err(io(path, "set length", end))?;
    file.sync_data().map_err(io(path, "sync", 0))?;
    Ok(())
}
