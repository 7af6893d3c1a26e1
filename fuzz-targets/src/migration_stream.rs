//! The live-migration stream decoder (`vmm::migration::stream`) on hostile bytes: a header,
//! then records. Oracles beyond "no panic, bounded memory": what decodes re-encodes to a
//! stream that decodes to the same records; every error names the peer and an offset inside
//! the input; every VM state record goes through the checkpoint state decoder too.

use vmm::migration::stream::{
    decode_all, encode, encode_header, our_version, Record, StreamError, WireConfig, WireDisk,
    PAGE, PROTOCOL_VERSION,
};

/// The target body.
pub fn migration_stream(data: &[u8]) {
    match decode_all(data) {
        Ok(records) => {
            let mut again = encode_header(PROTOCOL_VERSION, our_version());
            for r in &records {
                if let Record::State(bytes) = r {
                    let _ = vmm::state::decode_state(std::path::Path::new("fuzz"), bytes);
                }
                again.extend_from_slice(&encode(r));
            }
            assert_eq!(
                decode_all(&again).expect("a re-encoded stream decodes"),
                records,
                "records changed through encode and decode"
            );
        }
        Err(e) => {
            let offset = match &e {
                StreamError::Io { offset, .. } | StreamError::Corrupt { offset, .. } => *offset,
                StreamError::Version { .. } | StreamError::Remote { .. } => 0,
            };
            assert!(
                offset <= data.len() as u64,
                "offset {offset} past the input: {e}"
            );
            assert!(e.to_string().contains("peer fuzz"), "{e}");
        }
    }
}

/// Well-formed streams: every record kind, and a state container.
pub fn migration_stream_seeds() -> Vec<(String, Vec<u8>)> {
    let head = encode_header(PROTOCOL_VERSION, our_version());
    let config = Record::Config(WireConfig {
        memory: 256 << 20,
        cpus: 2,
        cmdline: "quiet".into(),
        transport: vmm::Transport::Mmio,
        disks: vec![WireDisk {
            path: "/work/disk.vhdx".into(),
            read_only: false,
        }],
    });
    let mut state = b"VHDKVMST".to_vec();
    state.extend_from_slice(&1u32.to_le_bytes());
    state.extend_from_slice(&2u64.to_le_bytes());
    state.extend_from_slice(&crc32c::crc32c(b"{}").to_le_bytes());
    state.extend_from_slice(b"{}");
    let full = [
        config.clone(),
        Record::Pages {
            gpa: 0x10_0000,
            data: (0..2 * PAGE).map(|i| i as u8).collect(),
        },
        Record::Zero {
            gpa: 0x20_0000,
            pages: 4,
        },
        Record::State(state),
        Record::DisksReleased,
        Record::Ready,
        Record::Go,
    ];
    let stream = |rs: &[Record]| {
        let mut s = head.clone();
        for r in rs {
            s.extend_from_slice(&encode(r));
        }
        s
    };
    vec![
        ("seed-full".into(), stream(&full)),
        ("seed-config".into(), stream(&[config])),
        (
            "seed-failed".into(),
            stream(&[Record::Failed("disk locked".into())]),
        ),
        ("seed-header".into(), head.clone()),
    ]
}
