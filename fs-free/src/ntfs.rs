//! NTFS: a cluster is free when its bit in `$Bitmap` (MFT record 6) is clear.
//!
//! ```text
//!   sector 0: boot sector ─ bytes/sector, sectors/cluster, total sectors, $MFT cluster,
//!             MFT record size
//!   $MFT record 0 ─ $DATA runlist: where the MFT itself lies
//!     record 2 $LogFile ─ restart area: clean?        record 3 $Volume ─ dirty flag
//!     record 6 $Bitmap  ─ $DATA runlist ─> bitmap: bit i = cluster i in use (LSB first)
//! ```
//!
//! Records are checked ("FILE", update sequence fixups at every 512-byte stride) before any
//! field is used; runlists are decoded with bounds on the number of runs and on every cluster
//! they name. Refused unless forced: `$Volume` marked dirty, or a `$LogFile` whose restart
//! area has clients in use and no clean flag (Windows hibernated or Fast Startup, or not shut
//! down cleanly). Base records only: a `$Bitmap` or `$Volume` whose attributes spilled into
//! extension records (an `$ATTRIBUTE_LIST`) is reported as unsupported.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::{
    clear_runs, unsafe_state, Error, FsType, Options, Result, Runs, Sink, Summary, Volume,
};

const FS: &str = "ntfs";
/// OEM ID of an NTFS boot sector.
pub const OEM_ID: &[u8; 8] = b"NTFS    ";
/// Most runs decoded from one runlist.
const MAX_RUNS: usize = 1 << 20;
/// Bitmap bytes read at a time.
const CHUNK: u64 = 1 << 20;
/// Largest MFT record accepted.
const MAX_RECORD: u64 = 64 << 10;

const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_LIST: u32 = 0x20;
const ATTR_END: u32 = 0xFFFF_FFFF;

/// The NTFS boot sector (first 84 bytes).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct BootSector {
    /// Jump instruction.
    pub jump: [u8; 3],
    /// `"NTFS    "`.
    pub oem: [u8; 8],
    /// Bytes per sector.
    pub bytes_per_sector: U16,
    /// Sectors per cluster (above 0x80: 2^(256 - value)).
    pub sectors_per_cluster: u8,
    /// Unused FAT fields.
    pub _fat: [u8; 7],
    /// Media descriptor.
    pub media: u8,
    /// Unused.
    pub _zero: U16,
    /// Sectors per track.
    pub sectors_per_track: U16,
    /// Heads.
    pub heads: U16,
    /// Hidden sectors.
    pub hidden_sectors: U32,
    /// Unused.
    pub _unused: [u8; 8],
    /// Sectors in the volume.
    pub total_sectors: U64,
    /// Cluster of `$MFT`.
    pub mft_lcn: U64,
    /// Cluster of `$MFTMirr`.
    pub mftmirr_lcn: U64,
    /// MFT record size: clusters if positive, else 2^(-value) bytes.
    pub clusters_per_mft_record: i8,
    /// Padding.
    pub _pad1: [u8; 3],
    /// Index block size, as above.
    pub clusters_per_index: i8,
    /// Padding.
    pub _pad2: [u8; 3],
    /// Serial number.
    pub serial: U64,
    /// Checksum (unused).
    pub checksum: U32,
}
const _: () = assert!(std::mem::size_of::<BootSector>() == 84);

/// The header of an MFT record (`FILE`).
#[repr(C)]
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
pub struct RecordHeader {
    /// `"FILE"`.
    pub magic: [u8; 4],
    /// Offset of the update sequence array.
    pub usa_offset: U16,
    /// Entries in it (1 + one per 512 bytes).
    pub usa_count: U16,
    /// $LogFile sequence number.
    pub lsn: U64,
    /// Sequence number.
    pub sequence: U16,
    /// Hard links.
    pub link_count: U16,
    /// Offset of the first attribute.
    pub attrs_offset: U16,
    /// 1 in use, 2 directory.
    pub flags: U16,
    /// Bytes used.
    pub bytes_in_use: U32,
    /// Bytes allocated.
    pub bytes_allocated: U32,
    /// Base record of an extension record.
    pub base_record: U64,
    /// Next attribute id.
    pub next_attr_id: U16,
}
const _: () = assert!(std::mem::size_of::<RecordHeader>() == 42);

/// A run: `count` clusters from `lcn` (`None`: sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First cluster on the volume, or `None` for a sparse run.
    pub lcn: Option<u64>,
    /// Length in clusters.
    pub count: u64,
}

/// Applies the update sequence fixups of a multi-sector record in place.
pub fn apply_fixups(rec: &mut [u8], what: &str, at: u64) -> Result<()> {
    let bad = |w: String| Error::corrupt(FS, what, at, w);
    if rec.len() < 8 {
        return Err(bad("record too short".into()));
    }
    let off = usize::from(u16::from_le_bytes([rec[4], rec[5]]));
    let count = usize::from(u16::from_le_bytes([rec[6], rec[7]]));
    if count < 2 || (count - 1) * 512 > rec.len() || off + count * 2 > rec.len() || off < 8 {
        return Err(bad(format!(
            "update sequence array at {off} with {count} entries"
        )));
    }
    let usn = [rec[off], rec[off + 1]];
    for i in 1..count {
        let end = i * 512;
        if rec[end - 2..end] != usn {
            return Err(bad(format!(
                "torn write: sector {} does not end with the update sequence number",
                i - 1
            )));
        }
        rec[end - 2] = rec[off + 2 * i];
        rec[end - 1] = rec[off + 2 * i + 1];
    }
    Ok(())
}

/// Decodes a runlist (mapping pairs); every LCN must lie below `clusters`.
pub fn decode_runs(data: &[u8], clusters: u64, what: &str, at: u64) -> Result<Vec<Run>> {
    let bad = |w: String| Error::corrupt(FS, what, at, w);
    let mut runs = Vec::new();
    let mut i = 0usize;
    let mut lcn: i64 = 0;
    loop {
        let Some(&h) = data.get(i) else {
            return Err(bad("runlist runs past its attribute".into()));
        };
        if h == 0 {
            break;
        }
        let (ls, os) = (usize::from(h & 0xF), usize::from(h >> 4));
        if ls == 0 || ls > 8 || os > 8 || i + 1 + ls + os > data.len() {
            return Err(bad(format!("run header {h:#x} at runlist byte {i}")));
        }
        let mut count = 0u64;
        for k in 0..ls {
            count |= u64::from(data[i + 1 + k]) << (8 * k);
        }
        let run_lcn = if os == 0 {
            None
        } else {
            let mut d = 0i64;
            for k in 0..os {
                d |= i64::from(data[i + 1 + ls + k]) << (8 * k);
            }
            if os < 8 && data[i + ls + os] & 0x80 != 0 {
                d |= -1i64 << (8 * os);
            }
            lcn = lcn
                .checked_add(d)
                .ok_or_else(|| bad("run offset overflows".into()))?;
            let end = (lcn as u64).checked_add(count);
            if lcn < 0 || end.is_none_or(|e| e > clusters) {
                return Err(bad(format!(
                    "run of {count} clusters at cluster {lcn} lies outside the volume \
                     ({clusters} clusters)"
                )));
            }
            Some(lcn as u64)
        };
        if count == 0 {
            return Err(bad("empty run".into()));
        }
        runs.push(Run {
            lcn: run_lcn,
            count,
        });
        if runs.len() > MAX_RUNS {
            return Err(Error::unsupported(
                FS,
                format!("a runlist of over {MAX_RUNS} runs"),
            ));
        }
        i += 1 + ls + os;
    }
    Ok(runs)
}

/// An attribute of a record: type, whether resident, and its bytes.
struct Attr<'a> {
    kind: u32,
    named: bool,
    non_resident: bool,
    bytes: &'a [u8],
}

/// The attributes of a fixed-up record.
fn attributes<'a>(rec: &'a [u8], what: &str, at: u64) -> Result<Vec<Attr<'a>>> {
    let bad = |w: String| Error::corrupt(FS, what, at, w);
    let h = RecordHeader::read_from_bytes(&rec[..42]).map_err(|_| bad("short".into()))?;
    if &h.magic != b"FILE" {
        return Err(bad(format!("magic {:?}, not FILE", h.magic)));
    }
    let used = (h.bytes_in_use.get() as usize).min(rec.len());
    let mut pos = usize::from(h.attrs_offset.get());
    let mut out = Vec::new();
    while pos + 8 <= used {
        let kind = u32::from_le_bytes(rec[pos..pos + 4].try_into().unwrap_or([0xFF; 4]));
        if kind == ATTR_END {
            return Ok(out);
        }
        let len = u32::from_le_bytes(rec[pos + 4..pos + 8].try_into().unwrap_or([0; 4])) as usize;
        if len < 24 || pos + len > used || len % 8 != 0 {
            return Err(bad(format!("attribute {kind:#x} at {pos} of length {len}")));
        }
        let bytes = &rec[pos..pos + len];
        out.push(Attr {
            kind,
            named: bytes[9] != 0,
            non_resident: bytes[8] != 0,
            bytes,
        });
        pos += len;
        if out.len() > 512 {
            break;
        }
    }
    Err(bad("attributes do not end with the end marker".into()))
}

/// A resident attribute's value.
fn resident_value<'a>(a: &Attr<'a>, what: &str, at: u64) -> Result<&'a [u8]> {
    let b = a.bytes;
    let len = u32::from_le_bytes(b[16..20].try_into().unwrap_or([0; 4])) as usize;
    let off = usize::from(u16::from_le_bytes([b[20], b[21]]));
    b.get(off..off.saturating_add(len))
        .ok_or_else(|| Error::corrupt(FS, what, at, "resident value outside its attribute"))
}

/// A non-resident attribute's runs and data size.
fn nonresident(a: &Attr<'_>, clusters: u64, what: &str, at: u64) -> Result<(Vec<Run>, u64)> {
    let b = a.bytes;
    if b.len() < 64 {
        return Err(Error::corrupt(FS, what, at, "short non-resident attribute"));
    }
    let lowest = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
    if lowest != 0 {
        return Err(Error::unsupported(
            FS,
            format!("{what}: data split over extension records"),
        ));
    }
    let mp = usize::from(u16::from_le_bytes([b[32], b[33]]));
    let size = u64::from_le_bytes(b[48..56].try_into().unwrap_or([0; 8]));
    let runs = decode_runs(b.get(mp..).unwrap_or(&[]), clusters, what, at)?;
    Ok((runs, size))
}

struct Ntfs {
    cluster: u64,
    record: u64,
    mft_runs: Vec<Run>,
}

impl Ntfs {
    /// Reads and fixes up MFT record `n` (through the MFT's own runlist).
    fn record(&self, vol: &mut Volume<'_>, n: u64, what: &str) -> Result<(Vec<u8>, u64)> {
        let mut out = vec![0u8; self.record as usize];
        let mut done = 0u64;
        let start = n * self.record;
        let mut first_at = 0;
        while done < self.record {
            let (lcn, in_run) = self.locate(start + done, what)?;
            let at = lcn * self.cluster + in_run;
            if done == 0 {
                first_at = at;
            }
            let n = (self.record - done).min(self.cluster - in_run % self.cluster);
            vol.read(FS, what, at, &mut out[done as usize..(done + n) as usize])?;
            done += n;
        }
        apply_fixups(&mut out, what, first_at)?;
        Ok((out, first_at))
    }

    /// Cluster and offset inside it of MFT byte `off`.
    fn locate(&self, off: u64, what: &str) -> Result<(u64, u64)> {
        let mut vcn = off / self.cluster;
        for r in &self.mft_runs {
            if vcn < r.count {
                let lcn = r
                    .lcn
                    .ok_or_else(|| Error::corrupt(FS, what, 0, "the MFT has a sparse run"))?;
                return Ok((lcn + vcn, off % self.cluster));
            }
            vcn -= r.count;
        }
        Err(Error::corrupt(
            FS,
            what,
            0,
            "record lies past the end of the MFT",
        ))
    }
}

/// Scans an NTFS volume; see the [module docs](self).
pub fn scan(vol: &mut Volume<'_>, opts: Options, mut sink: Sink<'_>) -> Result<Summary> {
    let mut raw = [0u8; 512];
    vol.read(FS, "boot sector", 0, &mut raw)?;
    let b = BootSector::read_from_bytes(&raw[..84])
        .map_err(|_| Error::corrupt(FS, "boot sector", 0, "short"))?;
    let bad = |w: String| Error::corrupt(FS, "boot sector", 0, w);
    if &b.oem != OEM_ID {
        return Err(bad("no NTFS signature".into()));
    }
    let bps = u64::from(b.bytes_per_sector.get());
    if !matches!(bps, 256 | 512 | 1024 | 2048 | 4096) {
        return Err(bad(format!("{bps} bytes per sector")));
    }
    let spc = match b.sectors_per_cluster {
        0 => return Err(bad("0 sectors per cluster".into())),
        v if v <= 0x80 => u64::from(v),
        v => {
            let shift = 256 - u32::from(v);
            if shift > 20 {
                return Err(bad(format!("sectors per cluster 2^{shift}")));
            }
            1 << shift
        }
    };
    if !spc.is_power_of_two() {
        return Err(bad(format!("{spc} sectors per cluster")));
    }
    let cluster = spc * bps;
    if cluster > 2 << 20 {
        return Err(bad(format!("clusters of {cluster} bytes")));
    }
    let total = b
        .total_sectors
        .get()
        .checked_mul(bps)
        .filter(|&t| t <= vol.size())
        .ok_or_else(|| {
            bad(format!(
                "the file system ({} sectors) is larger than its volume ({} bytes)",
                b.total_sectors.get(),
                vol.size()
            ))
        })?;
    let clusters = total / cluster;
    let record = match b.clusters_per_mft_record {
        v if v > 0 => u64::from(v as u8) * cluster,
        v if (-16..=-9).contains(&v) => 1u64 << (-i32::from(v)),
        v => return Err(bad(format!("MFT record size code {v}"))),
    };
    if !(512..=MAX_RECORD).contains(&record) {
        return Err(bad(format!("MFT records of {record} bytes")));
    }
    let mft_lcn = b.mft_lcn.get();
    if mft_lcn >= clusters {
        return Err(bad(format!("$MFT at cluster {mft_lcn}, past the volume")));
    }
    // Record 0 at the MFT's start; its $DATA maps the whole MFT.
    let mut fs = Ntfs {
        cluster,
        record,
        mft_runs: vec![Run {
            lcn: Some(mft_lcn),
            count: record.div_ceil(cluster),
        }],
    };
    let (rec0, at0) = fs.record(vol, 0, "$MFT record 0")?;
    let attrs = attributes(&rec0, "$MFT record 0", at0)?;
    let data = attrs
        .iter()
        .find(|a| a.kind == ATTR_DATA && !a.named && a.non_resident)
        .ok_or_else(|| Error::corrupt(FS, "$MFT record 0", at0, "no $DATA"))?;
    fs.mft_runs = nonresident(data, clusters, "$MFT $DATA", at0)?.0;
    drop(attrs);

    let mut warnings = Vec::new();
    // $Volume: dirty flag.
    let (rec3, at3) = fs.record(vol, 3, "$Volume record")?;
    let attrs = attributes(&rec3, "$Volume record", at3)?;
    if attrs.iter().any(|a| a.kind == ATTR_LIST) {
        return Err(Error::unsupported(FS, "$Volume with an attribute list"));
    }
    let info = attrs
        .iter()
        .find(|a| a.kind == ATTR_VOLUME_INFORMATION && !a.non_resident)
        .ok_or_else(|| Error::corrupt(FS, "$Volume record", at3, "no $VOLUME_INFORMATION"))?;
    let v = resident_value(info, "$VOLUME_INFORMATION", at3)?;
    if v.len() < 12 {
        return Err(Error::corrupt(FS, "$VOLUME_INFORMATION", at3, "short"));
    }
    if u16::from_le_bytes([v[10], v[11]]) & 1 != 0 {
        unsafe_state(
            FS,
            opts,
            &mut warnings,
            "the volume is marked dirty: it is in use, or was not shut down cleanly; let \
             Windows check it (chkdsk) or run ntfsfix first"
                .into(),
        )?;
    }
    drop(attrs);
    // $LogFile: restart area clean?
    let (rec2, at2) = fs.record(vol, 2, "$LogFile record")?;
    let attrs = attributes(&rec2, "$LogFile record", at2)?;
    if let Some(d) = attrs
        .iter()
        .find(|a| a.kind == ATTR_DATA && !a.named && a.non_resident)
    {
        let (runs, _) = nonresident(d, clusters, "$LogFile $DATA", at2)?;
        if let Some(lcn) = runs.first().and_then(|r| r.lcn) {
            if let Some(reason) = logfile_unclean(vol, lcn * cluster)? {
                unsafe_state(FS, opts, &mut warnings, reason)?;
            }
        }
    }
    drop(attrs);
    // $Bitmap.
    let (rec6, at6) = fs.record(vol, 6, "$Bitmap record")?;
    let attrs = attributes(&rec6, "$Bitmap record", at6)?;
    if attrs.iter().any(|a| a.kind == ATTR_LIST) {
        return Err(Error::unsupported(FS, "$Bitmap with an attribute list"));
    }
    let d = attrs
        .iter()
        .find(|a| a.kind == ATTR_DATA && !a.named)
        .ok_or_else(|| Error::corrupt(FS, "$Bitmap record", at6, "no $DATA"))?;
    let need = clusters.div_ceil(8);
    let mut runs = Runs::new(&mut sink);
    if !d.non_resident {
        let v = resident_value(d, "$Bitmap $DATA", at6)?;
        if (v.len() as u64) < need {
            return Err(Error::corrupt(
                FS,
                "$Bitmap",
                at6,
                "shorter than the volume",
            ));
        }
        clear_runs(v, clusters, |c, n| runs.push(c * cluster, n * cluster));
    } else {
        let (bruns, size) = nonresident(d, clusters, "$Bitmap $DATA", at6)?;
        if size < need {
            return Err(Error::corrupt(
                FS,
                "$Bitmap $DATA",
                at6,
                format!("{size} bytes cannot cover {clusters} clusters"),
            ));
        }
        let mut buf = vec![0u8; CHUNK as usize];
        let mut done = 0u64; // bitmap bytes consumed
        'runs: for r in bruns {
            let Some(lcn) = r.lcn else {
                return Err(Error::corrupt(FS, "$Bitmap $DATA", at6, "sparse run"));
            };
            let mut pos = 0u64;
            let run_bytes = r.count * cluster;
            while pos < run_bytes {
                if done >= need {
                    break 'runs;
                }
                let n = (run_bytes - pos).min(CHUNK).min(need - done) as usize;
                vol.read(FS, "$Bitmap", lcn * cluster + pos, &mut buf[..n])?;
                let base = done * 8;
                let bits = (clusters - base).min(n as u64 * 8);
                clear_runs(&buf[..n], bits, |c, k| {
                    runs.push((base + c) * cluster, k * cluster)
                });
                pos += n as u64;
                done += n as u64;
            }
        }
        if done < need {
            return Err(Error::corrupt(
                FS,
                "$Bitmap $DATA",
                at6,
                "runs shorter than the bitmap",
            ));
        }
    }
    let free = runs.finish();
    Ok(Summary {
        fs: FsType::Ntfs,
        size: total,
        free,
        warnings,
    })
}

/// Why the `$LogFile` at byte `at` says the volume was not left clean, if it does.
fn logfile_unclean(vol: &mut Volume<'_>, at: u64) -> Result<Option<String>> {
    let mut page = vec![0u8; 4096];
    vol.read(FS, "$LogFile restart page", at, &mut page)?;
    match &page[..4] {
        // Emptied by mkntfs or ntfs-3g: nothing to replay.
        [0xFF, 0xFF, 0xFF, 0xFF] => return Ok(None),
        b"RSTR" => {}
        b"CHKD" => {
            return Ok(Some(
                "$LogFile is marked by chkdsk as needing a check; let Windows check it first"
                    .into(),
            ))
        }
        m => {
            return Err(Error::corrupt(
                FS,
                "$LogFile restart page",
                at,
                format!("magic {m:?}"),
            ))
        }
    }
    apply_fixups(&mut page, "$LogFile restart page", at)?;
    let ra = usize::from(u16::from_le_bytes([page[0x18], page[0x19]]));
    let Some(area) = page.get(ra..ra + 16) else {
        return Err(Error::corrupt(
            FS,
            "$LogFile restart page",
            at,
            format!("restart area at {ra}"),
        ));
    };
    let in_use = u16::from_le_bytes([area[0xC], area[0xD]]);
    let flags = u16::from_le_bytes([area[0xE], area[0xF]]);
    if in_use != 0xFFFF && flags & 0x2 == 0 {
        return Ok(Some(
            "$LogFile is not clean: Windows hibernated (Fast Startup) or was not shut down \
             cleanly; boot Windows and shut it down fully (shutdown /s) first"
                .into(),
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runlists_decode_with_negative_offsets_and_sparse_runs() {
        // 4 clusters at 0x100; sparse 2; 3 clusters at 0x100 - 0x10.
        let data = [0x21, 0x04, 0x00, 0x01, 0x01, 0x02, 0x11, 0x03, 0xF0, 0x00];
        let r = decode_runs(&data, 1 << 20, "t", 0).unwrap();
        assert_eq!(
            r,
            vec![
                Run {
                    lcn: Some(0x100),
                    count: 4
                },
                Run {
                    lcn: None,
                    count: 2
                },
                Run {
                    lcn: Some(0xF0),
                    count: 3
                },
            ]
        );
    }

    #[test]
    fn hostile_runlists_are_errors() {
        for data in [
            &[0x21, 0x04][..],                               // truncated
            &[0x11, 0x04, 0x80, 0x00][..],                   // negative LCN
            &[0x19, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], // 9-byte offset
            &[0x11, 0x04, 0x7F, 0x00][..],                   // past 100 clusters
            &[0x11, 0x00, 0x10, 0x00][..],                   // empty run
        ] {
            assert!(decode_runs(data, 100, "t", 0).is_err(), "{data:?}");
        }
    }

    #[test]
    fn fixups_detect_torn_sectors() {
        let mut rec = vec![0u8; 1024];
        rec[4] = 0x30; // usa at 0x30
        rec[6] = 3; // usn + 2 entries
        rec[0x30] = 0xAB;
        rec[0x31] = 0xCD;
        rec[0x32] = 1;
        rec[0x34] = 2;
        rec[510] = 0xAB;
        rec[511] = 0xCD;
        rec[1022] = 0xAB;
        rec[1023] = 0xCD;
        let mut ok = rec.clone();
        apply_fixups(&mut ok, "t", 0).unwrap();
        assert_eq!((ok[510], ok[1022]), (1, 2));
        rec[1023] = 0;
        assert!(apply_fixups(&mut rec, "t", 0).is_err());
        let mut short = vec![0u8; 4];
        assert!(apply_fixups(&mut short, "t", 0).is_err());
    }
}
