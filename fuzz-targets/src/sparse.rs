//! A compact encoding of mostly-zero files, so VHDX images (at least 3 MiB, nearly all zeros)
//! make small fuzz inputs whose every byte matters.
//!
//! ```text
//! "VXSP" | file length: u32 LE (capped at MAX_LEN) | record*
//! record: offset u32 LE | length u16 LE | bytes[length]   (clipped to the file; the last may be short)
//! ```
//!
//! An input that does not start with the magic is the file itself, so any raw image (or a crash
//! found elsewhere) replays as is. The magic `VXSS` decodes the same way and then recomputes
//! every checksum of the file ([`crate::reseal`]), letting mutations past them.

/// Marks an encoded input.
pub const MAGIC: &[u8; 4] = b"VXSP";
/// Marks an encoded input whose checksums are recomputed after decoding.
pub const MAGIC_RESEALED: &[u8; 4] = b"VXSS";
/// Largest file an encoded input describes (bounds the memory a fuzz input costs).
pub const MAX_LEN: u32 = 16 << 20;

/// The file an input stands for.
pub fn decode(data: &[u8]) -> Vec<u8> {
    if let Some(body) = data.strip_prefix(MAGIC_RESEALED) {
        let mut file = decode_body(body);
        crate::reseal::reseal(&mut file);
        return file;
    }
    match data.strip_prefix(MAGIC) {
        Some(body) => decode_body(body),
        None => data.to_vec(),
    }
}

fn decode_body(body: &[u8]) -> Vec<u8> {
    if body.len() < 4 {
        return Vec::new();
    }
    let len = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")).min(MAX_LEN) as usize;
    let mut out = vec![0u8; len];
    let mut rest = &body[4..];
    while rest.len() >= 6 {
        let at = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let n = u16::from_le_bytes([rest[4], rest[5]]) as usize;
        let bytes = &rest[6..(6 + n).min(rest.len())];
        rest = &rest[6 + bytes.len()..];
        if at < len {
            let end = (at + bytes.len()).min(len);
            out[at..end].copy_from_slice(&bytes[..end - at]);
        }
    }
    out
}

/// Encodes `file` (at most [`MAX_LEN`] bytes): runs of non-zero 512-byte sectors, gaps of zero
/// sectors shorter than 4 KiB kept inline.
pub fn encode(file: &[u8]) -> Vec<u8> {
    assert!(file.len() <= MAX_LEN as usize, "file too large to encode");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(file.len() as u32).to_le_bytes());
    let sectors = file.len().div_ceil(512);
    let zero = |s: usize| {
        file[s * 512..((s + 1) * 512).min(file.len())]
            .iter()
            .all(|&b| b == 0)
    };
    let mut s = 0;
    while s < sectors {
        if zero(s) {
            s += 1;
            continue;
        }
        let start = s;
        let mut end = s + 1;
        // Extend over non-zero sectors and short zero gaps.
        loop {
            let mut next = end;
            while next < sectors && next - end < 8 && zero(next) {
                next += 1;
            }
            if next < sectors && next - end < 8 && !zero(next) {
                end = next + 1;
            } else {
                break;
            }
        }
        let (a, b) = (start * 512, (end * 512).min(file.len()));
        for chunk_start in (a..b).step_by(0xFE00) {
            let chunk = &file[chunk_start..(chunk_start + 0xFE00).min(b)];
            out.extend_from_slice(&(chunk_start as u32).to_le_bytes());
            out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        s = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_is_small_for_sparse_files() {
        let mut f = vec![0u8; 3 << 20];
        f[0..8].copy_from_slice(b"vhdxfile");
        f[65536..65540].copy_from_slice(b"head");
        f[(2 << 20) + 7] = 9;
        f[(3 << 20) - 1] = 1;
        let e = encode(&f);
        assert!(e.len() < 4096, "{} bytes", e.len());
        assert_eq!(decode(&e), f);
    }

    #[test]
    fn raw_inputs_decode_to_themselves_and_junk_never_panics() {
        assert_eq!(decode(b"conectix"), b"conectix");
        assert_eq!(decode(b"VXSP"), Vec::<u8>::new());
        let d = decode(b"VXSP\x10\x00\x00\x00\x0e\x00\x00\x00\xff\xffabc");
        assert_eq!(d.len(), 16);
        assert_eq!(&d[14..], b"ab");
        assert_eq!(decode(b"VXSS\x10\x00\x00\x00"), vec![0u8; 16]);
    }

    #[test]
    fn resealed_inputs_get_valid_checksums() {
        // A VHD footer whose checksum is wrong: the resealed decoding fixes it.
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[64..68].copy_from_slice(&[1, 2, 3, 4]);
        let mut enc = encode(&f);
        enc[..4].copy_from_slice(MAGIC_RESEALED);
        let d = decode(&enc);
        let sum = d
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |s, (_, &b)| s + b as u32);
        assert_eq!(&d[64..68], &(!sum).to_be_bytes());
    }
}
