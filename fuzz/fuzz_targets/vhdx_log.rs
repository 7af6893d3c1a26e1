//! Fuzz the VHDX log scanner: any bytes as a log region must yield a replay or nothing, within
//! bounded work.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let guid = uuid::Uuid::from_slice(&data[..16]).expect("16 bytes");
    let mut log = data[16..].to_vec();
    log.truncate(log.len() / 4096 * 4096);
    let _ = vhdx::log::find_replay(&log, guid);
});
