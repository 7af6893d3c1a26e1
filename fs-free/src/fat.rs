//! FAT12/16/32 (stub).
use crate::{FsType, Options, Result, Sink, Summary, Volume};
/// FAT type of a boot sector.
pub fn probe(_boot: &[u8; 512]) -> Option<FsType> {
    None
}
/// Scans.
pub fn scan(_vol: &mut Volume<'_>, _opts: Options, _sink: Sink<'_>) -> Result<Summary> {
    unimplemented!()
}
