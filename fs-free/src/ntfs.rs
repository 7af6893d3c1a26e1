//! NTFS (stub).
use crate::{Options, Result, Sink, Summary, Volume};
/// OEM name.
pub const OEM_ID: &[u8; 8] = b"NTFS    ";
/// Scans.
pub fn scan(_vol: &mut Volume<'_>, _opts: Options, _sink: Sink<'_>) -> Result<Summary> {
    unimplemented!()
}
