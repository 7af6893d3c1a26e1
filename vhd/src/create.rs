//! Creating images: fixed, dynamic and differencing.
//!
//! The new file is written under a temporary name in the target directory, synced, and then
//! hard-linked to the final name (which fails if that name exists, so nothing is overwritten) and
//! the temporary name removed. A crash leaves either no image or a complete one.
//!
//! Size choice (see [`Footer::new_vhdkit`]): current size = the exact requested size, creator
//! `vhdk`, geometry by the spec when its CHS product equals the size, otherwise 65535/16/255.
//! qemu-img (7.2 and 10) uses the current size when the geometry is maximal, libvhdi always uses
//! it, and Hyper-V uses it by design; so all of them read exactly the requested size. Sizes must
//! be multiples of 512 and at most 2040 GiB.

use crate::dynamic_header::{DynamicHeader, DEFAULT_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::footer::{vhd_timestamp_now, DiskType, Footer, MAX_VIRTUAL_SIZE, VHD_EPOCH_OFFSET};
use crate::image::{OpenMode, VhdImage};
use crate::layout::{write_at, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::locator::{
    base_name, encode_utf16le, relative_windows_path, LocatorEntry, PlatformCode,
};
use image_io::ImageFile;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Fixed or dynamic (a parent makes a differencing image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdType {
    /// Raw data followed by a footer.
    Fixed,
    /// Sparse; blocks allocated on first write.
    Dynamic,
}

/// Options for [`VhdImage::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (ignored with a parent: the parent's size is used).
    pub size: u64,
    /// Fixed or dynamic; ignored with a parent.
    pub vhd_type: VhdType,
    /// Block size for dynamic and differencing images (default 2 MiB).
    pub block_size: u32,
    /// Fixed images only: leave the data area sparse instead of writing zeros. Windows refuses
    /// some sparse VHD files, so the default is a fully allocated file.
    pub sparse: bool,
    /// Parent image: makes a differencing image. The parent is opened read-only.
    pub parent: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            vhd_type: VhdType::Dynamic,
            block_size: DEFAULT_BLOCK_SIZE,
            sparse: false,
            parent: None,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.into(),
        op,
        offset: 0,
        source,
    }
}

/// Validates a virtual size for a new image.
pub fn validate_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(Error::InvalidArgument(format!(
            "virtual size {size} must be a positive multiple of 512 bytes"
        )));
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::InvalidArgument(format!(
            "virtual size {size} exceeds the VHD limit of 2040 GiB ({MAX_VIRTUAL_SIZE} bytes); use VHDX for larger disks"
        )));
    }
    Ok(())
}

impl VhdImage {
    /// Creates a new image at `path` (which must not exist) and opens it read-write.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VhdImage> {
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} already exists",
                path.display()
            )));
        }
        let block = opts.block_size;
        if !block.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block) {
            return Err(Error::InvalidArgument(format!(
                "block size {block} must be a power of two from 4 KiB to 256 MiB"
            )));
        }
        let dir = image_io::publish::parent_dir(path);
        let tmp = image_io::publish::temp_name(path);
        let parent = match &opts.parent {
            Some(p) => Some(ParentInfo::read(p, &dir)?),
            None => None,
        };
        let result = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))
            .and_then(|file| write_new(&file, &tmp, opts, parent.as_ref()))
            .and_then(|()| {
                image_io::publish::publish(&tmp, path, false)
                    .map_err(io_err(path, "rename into place"))
            });
        let _ = std::fs::remove_file(&tmp);
        result?;
        VhdImage::open(path, OpenMode::ReadWrite)
    }
}

impl<F: ImageFile> VhdImage<F> {
    /// Writes a new image into the empty `file` and opens it read-write (for images that do not
    /// live in a plain file, such as crash-test files). `opts.parent` is ignored: a
    /// differencing image takes its parent from `parent`.
    pub fn create_in(
        file: F,
        path: &Path,
        opts: &CreateOptions,
        parent: Option<&ParentInfo>,
    ) -> Result<VhdImage<F>> {
        write_new(&file, path, opts, parent)?;
        VhdImage::open_file(file, path, OpenMode::ReadWrite)
    }
}

/// Writes a complete image into `file` (named `tmp` in errors).
fn write_new<F: ImageFile>(
    file: &F,
    tmp: &Path,
    opts: &CreateOptions,
    parent: Option<&ParentInfo>,
) -> Result<()> {
    let now = vhd_timestamp_now();
    let (size, disk_type) = match (&parent, opts.vhd_type) {
        (Some(p), _) => (p.size, DiskType::Differencing),
        (None, VhdType::Fixed) => (opts.size, DiskType::Fixed),
        (None, VhdType::Dynamic) => (opts.size, DiskType::Dynamic),
    };
    validate_size(size)?;
    let footer = Footer::new_vhdkit(size, disk_type, Uuid::new_v4(), now);
    let fb = footer.to_bytes();
    if disk_type == DiskType::Fixed {
        if opts.sparse {
            file.set_len(size).map_err(io_err(tmp, "extend"))?;
        } else {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                write_at(file, tmp, &zeros[..n], at, "preallocate")?;
                at += n as u64;
            }
        }
        write_at(file, tmp, &fb, size, "write footer")?;
    } else {
        let entries = size.div_ceil(opts.block_size as u64);
        let entries32 =
            u32::try_from(entries).map_err(|_| Error::InvalidArgument("too many blocks".into()))?;
        let table_offset = 1536u64;
        let bat_bytes = (entries * 4).next_multiple_of(512);
        let mut header = DynamicHeader::new(table_offset, entries32, opts.block_size);
        let mut end = table_offset + bat_bytes;
        let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some(p) = parent {
            header.parent_uuid = p.uuid;
            header.parent_timestamp = p.timestamp;
            header.parent_unicode_name = base_name(&p.absolute.to_string_lossy()).to_string();
            let rel = p.relative.clone();
            let abs = p.absolute.to_string_lossy().into_owned();
            for (i, (code, text)) in [(PlatformCode::W2RU, rel), (PlatformCode::W2KU, abs)]
                .into_iter()
                .enumerate()
            {
                let data = encode_utf16le(&text);
                let space = (data.len() as u64).next_multiple_of(512).max(512);
                header.locators[i] = LocatorEntry {
                    code,
                    data_space: space as u32,
                    data_length: data.len() as u32,
                    reserved: 0,
                    data_offset: end,
                };
                locator_data.push((end, data));
                end += space;
            }
        }
        write_at(file, tmp, &fb, 0, "write footer copy")?;
        write_at(file, tmp, &header.to_bytes(), 512, "write dynamic header")?;
        write_at(
            file,
            tmp,
            &vec![0xFF; bat_bytes as usize],
            table_offset,
            "write BAT",
        )?;
        for (at, data) in locator_data {
            write_at(file, tmp, &data, at, "write parent locator")?;
        }
        write_at(file, tmp, &fb, end, "write footer")?;
    }
    file.sync_data().map_err(io_err(tmp, "sync"))
}

/// What a differencing child records about its parent.
#[derive(Debug, Clone)]
pub struct ParentInfo {
    /// Absolute path of the parent.
    pub absolute: PathBuf,
    /// Path of the parent relative to the child's directory, Windows style (`.\p.vhd`).
    pub relative: String,
    /// The parent's virtual size.
    pub size: u64,
    /// The parent's unique id.
    pub uuid: Uuid,
    /// The parent's modification time (seconds since 2000).
    pub timestamp: u32,
}

impl ParentInfo {
    /// Reads the VHD at `path` as the parent of a child to be created in `child_dir`.
    pub fn read(path: &Path, child_dir: &Path) -> Result<ParentInfo> {
        let img = VhdImage::open(path, OpenMode::ReadOnly)?;
        let absolute = std::fs::canonicalize(path).map_err(io_err(path, "resolve parent path"))?;
        let dir =
            std::fs::canonicalize(child_dir).map_err(io_err(child_dir, "resolve directory"))?;
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| {
                d.as_secs()
                    .saturating_sub(VHD_EPOCH_OFFSET)
                    .min(u32::MAX as u64) as u32
            });
        Ok(ParentInfo {
            relative: relative_windows_path(&dir, &absolute),
            absolute,
            size: img.virtual_size(),
            uuid: img.uuid(),
            timestamp: mtime,
        })
    }
}
