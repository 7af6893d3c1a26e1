//! `vhdx_log`: the VHDX log scanner, on arbitrary log regions and on logs built by our writer.

use crate::input::{pattern, Input};
use uuid::Uuid;
use vhdx::log::{build_entry, find_replay, LogWrite, Replay, SECTOR};

/// First byte even: the rest is a log GUID (16 bytes) and a log region (cut to whole 4 KiB
/// sectors); the scan must end, be deterministic, and return only aligned writes. First byte
/// odd: the rest chooses entries that [`build_entry`] writes into a zeroed log at consecutive
/// (possibly wrapping) positions; the replay must be exactly the last entry.
pub fn vhdx_log(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8().is_multiple_of(2) {
        scan(&mut input);
    } else {
        round_trip(&mut input);
    }
}

fn scan(input: &mut Input) {
    let guid = Uuid::from_bytes(input.bytes(16).try_into().unwrap_or([0; 16]));
    let mut log = input.rest().to_vec();
    log.truncate(log.len() / SECTOR * SECTOR);
    let first = find_replay(&log, guid);
    if let Ok(Some(r)) = &first {
        for w in &r.writes {
            match w {
                LogWrite::Page { offset, .. } => assert_eq!(offset % SECTOR as u64, 0, "{w:?}"),
                LogWrite::Zero { offset, length } => {
                    assert_eq!(offset % SECTOR as u64, 0, "{w:?}");
                    assert_eq!(length % SECTOR as u64, 0, "{w:?}");
                }
            }
        }
        assert!(r.next_offset < log.len() as u64 && r.next_offset % SECTOR as u64 == 0);
    }
    assert_eq!(
        first,
        find_replay(&log, guid),
        "the scan is not deterministic"
    );
}

fn round_trip(input: &mut Input) {
    let guid = Uuid::from_bytes(input.bytes(16).try_into().unwrap_or([0; 16]));
    if guid.is_nil() {
        return; // a nil LogGuid means "no log"
    }
    let sectors = 1 + input.u8() as usize % 48;
    let mut log = vec![0u8; sectors * SECTOR];
    let n = log.len() as u64;
    let mut at = (input.u8() as u64 % sectors as u64) * SECTOR as u64;
    let first_sequence = (input.u64() >> 8).max(1);
    let entries = 1 + input.u8() as usize % 4;
    let mut used = 0u64;
    let mut expected = None;
    for i in 0..entries {
        let pages: Vec<(u64, Box<[u8; SECTOR]>)> = (0..input.u8() % 8)
            .map(|_| {
                let offset = input.u32() as u64 * SECTOR as u64;
                let mut page = Box::new([0u8; SECTOR]);
                page.copy_from_slice(&pattern(input.u64(), SECTOR));
                (offset, page)
            })
            .collect();
        let refs: Vec<(u64, &[u8; SECTOR])> = pages.iter().map(|(o, p)| (*o, &**p)).collect();
        let (flushed, last) = (input.u64(), input.u64());
        let sequence = first_sequence + i as u64;
        let entry = build_entry(at, sequence, guid, flushed, last, &refs);
        used += entry.len() as u64;
        if used > n {
            break;
        }
        for (k, b) in entry.iter().enumerate() {
            log[((at + k as u64) % n) as usize] = *b;
        }
        at = (at + entry.len() as u64) % n;
        expected = Some(Replay {
            writes: pages
                .into_iter()
                .map(|(offset, data)| LogWrite::Page { offset, data })
                .collect(),
            last_file_offset: last,
            flushed_file_offset: flushed,
            head_sequence: sequence,
            next_offset: at,
        });
    }
    let Some(expected) = expected else { return };
    assert_eq!(
        find_replay(&log, guid),
        Ok(Some(expected)),
        "the log our writer built does not replay to its last entry"
    );
}
