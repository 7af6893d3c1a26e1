//! Recomputes every checksum of a VHD or VHDX file, so the fuzzer can reach the code behind
//! them: a mutated field otherwise ends at the checksum test, and CRC-32C is beyond what
//! comparison tracing can solve. Inputs opt in (see [`crate::sparse`]: the `VXSS` magic); the
//! rest keep their checksums as they are, so checksum handling is fuzzed too.

/// VHD: the trailing footer and its copy at offset 0 (one's-complement byte sums), and the
/// dynamic header the footer points at. VHDX: both headers, both region tables and every log
/// entry the current header's log region holds (CRC-32C).
pub fn reseal(b: &mut [u8]) {
    if b.starts_with(b"vhdxfile") {
        reseal_vhdx(b);
    } else {
        reseal_vhd(b);
    }
}

fn vhd_sum(b: &mut [u8], at: usize, len: usize, field: usize) {
    if at.checked_add(len).is_none_or(|e| e > b.len()) {
        return;
    }
    b[at + field..at + field + 4].fill(0);
    let sum = b[at..at + len]
        .iter()
        .fold(0u32, |s, &x| s.wrapping_add(x as u32));
    b[at + field..at + field + 4].copy_from_slice(&(!sum).to_be_bytes());
}

fn reseal_vhd(b: &mut [u8]) {
    if b.len() < 512 {
        return;
    }
    let footer = b.len() - 512;
    for at in [0, footer] {
        if &b[at..at + 8] == b"conectix" {
            vhd_sum(b, at, 512, 64);
        }
    }
    let src = if &b[footer..footer + 8] == b"conectix" {
        footer
    } else {
        0
    };
    let header = u64::from_be_bytes(b[src + 16..src + 24].try_into().expect("8 bytes"));
    if let Ok(h) = usize::try_from(header) {
        if h.checked_add(1024).is_some_and(|e| e <= b.len()) && &b[h..h + 8] == b"cxsparse" {
            vhd_sum(b, h, 1024, 36);
        }
    }
}

fn crc(b: &mut [u8], at: usize, len: usize) {
    if at.checked_add(len).is_none_or(|e| e > b.len()) || len < 8 {
        return;
    }
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

fn reseal_vhdx(b: &mut [u8]) {
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    for at in [192 << 10, 256 << 10] {
        crc(b, at, 64 << 10);
    }
    let mut current = None;
    for at in [64 << 10, 128 << 10] {
        if b.len() >= at + 4096 {
            crc(b, at, 4096);
            let seq = u64_at(b, at + 8);
            if current.is_none_or(|(_, s)| seq > s) {
                current = Some((at, seq));
            }
        }
    }
    let Some((h, _)) = current else { return };
    let (log_len, log_off) = (u32_at(b, h + 68) as usize, u64_at(b, h + 72));
    let Some(log_off) = usize::try_from(log_off)
        .ok()
        .filter(|&o| o.checked_add(log_len).is_some_and(|e| e <= b.len()))
    else {
        return;
    };
    // Entries are sealed where they lie whole inside the log region (not across its end).
    let mut at = 0;
    while at + 4096 <= log_len {
        let e = log_off + at;
        if &b[e..e + 4] == b"loge" {
            let len = u32_at(b, e + 8) as usize;
            if len >= 4096 && len.is_multiple_of(4096) && at + len <= log_len {
                crc(b, e, len);
                at += len;
                continue;
            }
        }
        at += 4096;
    }
}
