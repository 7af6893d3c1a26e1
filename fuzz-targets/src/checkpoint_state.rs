//! The checkpoint decoder (`vmm::state::decode_checkpoint`: `manifest.json` and
//! `vmstate.bin` together) on hostile bytes.
//!
//! Input: `flags u8 | manifest length u32 LE | manifest | state`. Flag bit 0 reseals the input
//! first (the state container's length and CRC-32C, the manifest's state length and CRC-32C),
//! so that mutations reach the JSON parsers and the cross-checks behind the checksums.
//!
//! Oracles beyond "no panic, bounded memory": a checkpoint that decodes encodes again to one
//! that decodes to the same manifest and the same state bytes; every error names the
//! checkpoint's folder, and a corrupt structure's offset lies inside the file it names.

use std::path::Path;

use vmm::state::{decode_checkpoint, encode_manifest, encode_state, StateError, HEADER_LEN};

/// The folder errors must name.
const DIR: &str = "fuzz-ck";

/// The target body.
pub fn checkpoint_state(data: &[u8]) {
    let Some((flags, manifest, state)) = checkpoint_parts(data) else {
        return;
    };
    let (mut manifest, mut state) = (manifest.to_vec(), state.to_vec());
    if flags & 1 != 0 {
        reseal_state(&mut state);
        reseal_manifest(&mut manifest, state.len() as u64);
    }
    let dir = Path::new(DIR);
    let given = state.clone();
    match decode_checkpoint(dir, &manifest, |_, _| Ok(given)) {
        Ok((m, s)) => {
            let state2 = encode_state(&s);
            let mut m2 = m.clone();
            m2.state.len = state2.len() as u64;
            let again = decode_checkpoint(dir, &encode_manifest(&m2), |_, _| Ok(state2.clone()))
                .expect("a re-encoded checkpoint decodes");
            assert_eq!(
                again.0, m2,
                "the manifest changed through encode and decode"
            );
            assert_eq!(
                encode_state(&again.1),
                state2,
                "the state changed through encode and decode"
            );
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(DIR),
                "the error does not name the folder: {text}"
            );
            if let StateError::Corrupt { path, offset, .. } = &e {
                let len = if path.ends_with("manifest.json") {
                    manifest.len()
                } else {
                    state.len()
                };
                assert!(
                    *offset <= len as u64,
                    "offset {offset} past {} ({len} bytes): {text}",
                    path.display()
                );
            }
        }
    }
}

/// Sets a `vmstate.bin` container's body length and CRC-32C to fit its body.
fn reseal_state(state: &mut [u8]) {
    if state.len() < HEADER_LEN {
        return;
    }
    let body_len = (state.len() - HEADER_LEN) as u64;
    state[12..20].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32c::crc32c(&state[HEADER_LEN..]);
    state[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Sets a manifest's state length and its CRC-32C, if it parses as one.
fn reseal_manifest(manifest: &mut Vec<u8>, state_len: u64) {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return;
    };
    let Some(body) = v.get_mut("manifest") else {
        return;
    };
    if let Some(len) = body.pointer_mut("/state/len") {
        *len = state_len.into();
    }
    let crc = crc32c::crc32c(body.to_string().as_bytes());
    if let Some(obj) = v.as_object_mut() {
        obj.insert("crc32c".into(), crc.into());
    }
    *manifest = serde_json::to_vec(&v).unwrap_or_default();
}

/// An input of this target split into its flags, manifest and state (`None`: too short).
pub fn checkpoint_parts(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&flags, rest) = data.split_first()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (manifest, state) = rest.split_at((u32::from_le_bytes(*len) as usize).min(rest.len()));
    Some((flags, manifest, state))
}
