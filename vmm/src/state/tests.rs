use super::*;

pub(super) fn sample() -> VmState {
    VmState {
        vcpus: vec![VcpuState {
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 1,
                ebx: 2,
                ecx: 3,
                edx: 4,
            }],
            mp_state: Default::default(),
            regs: kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Msr {
                index: 0x10,
                data: 12345,
            }],
            events: Default::default(),
            tsc_khz: 2_000_000,
        }],
        kvm: VmKvmState {
            irqchips: vec![Default::default(); 3],
            pit: Default::default(),
            clock: Default::default(),
        },
        transports: vec![TransportState {
            status: 15,
            device_features_sel: 0,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queue_sel: 0,
            interrupt_status: 1,
            queues: vec![QueueState {
                size: 256,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 7,
                next_used: 7,
                event_idx: true,
            }],
        }],
        serial: SerialState {
            registers: [1, 0, 0, 1, 3, 0x60, 8, 0xb0, 0],
            in_buffer: vec![b'x'],
        },
        pci: None,
    }
}

pub(super) fn manifest() -> Manifest {
    Manifest {
        kind: MANIFEST_KIND.into(),
        version: MMIO_STATE_VERSION,
        writer: "vhdtool test".into(),
        memory: 256 << 20,
        cpus: 1,
        cmdline: "quiet".into(),
        transport: crate::Transport::Mmio,
        disks: vec![ManifestDisk {
            frozen: "/x/disk.vhdx".into(),
            identity: LayerIdentity {
                uuid: Some("0a0b".into()),
                size: 4 << 20,
                mtime_ns: 1_700_000_000_000_000_000,
            },
            read_only: false,
        }],
        state: ManifestFile {
            name: STATE_FILE.into(),
            len: 100,
            crc32c: 7,
        },
        memory_file: ManifestFile {
            name: MEMORY_FILE.into(),
            len: 256 << 20,
            crc32c: 9,
        },
    }
}

pub(super) fn err(e: StateError) -> (u64, String) {
    match e {
        StateError::Corrupt {
            offset,
            detail,
            path,
            ..
        } => {
            assert_eq!(path, Path::new("ck/vmstate.bin"));
            (offset, detail)
        }
        other => panic!("{other}"),
    }
}

#[test]
fn state_round_trips_through_its_container() {
    let bytes = encode_state(&sample());
    let back = decode_state(Path::new("ck/vmstate.bin"), &bytes).unwrap();
    assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
    assert_eq!(back.vcpus[0].msrs, sample().vcpus[0].msrs);
    assert_eq!(back.transports, sample().transports);
    assert_eq!(back.serial, sample().serial);
}

#[test]
fn truncated_state_is_refused_naming_file_and_offset() {
    let bytes = encode_state(&sample());
    let p = Path::new("ck/vmstate.bin");
    let (off, d) = err(decode_state(p, &bytes[..10]).unwrap_err());
    assert_eq!(off, 10);
    assert!(d.contains("truncated"), "{d}");
    let (off, d) = err(decode_state(p, &bytes[..bytes.len() - 1]).unwrap_err());
    assert_eq!(off, 12, "the length field");
    assert!(d.contains("body length"), "{d}");
}

#[test]
fn any_flipped_body_byte_fails_the_checksum() {
    let good = encode_state(&sample());
    let p = Path::new("ck/vmstate.bin");
    for at in [HEADER_LEN, HEADER_LEN + 100, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        let (off, d) = err(decode_state(p, &bad).unwrap_err());
        assert_eq!(off, HEADER_LEN as u64);
        assert!(d.contains("checksum"), "{d}");
    }
}

#[test]
fn other_versions_and_foreign_files_are_refused() {
    let p = Path::new("ck/vmstate.bin");
    let mut v3 = encode_state(&sample());
    v3[8] = 3;
    let (off, d) = err(decode_state(p, &v3).unwrap_err());
    assert_eq!(off, 8);
    assert!(d.contains("version 3"), "{d}");
    let (off, d) = err(decode_state(p, &[0x7f; 64]).unwrap_err());
    assert_eq!(off, 0);
    assert!(d.contains("magic"), "{d}");
    // A huge length field is refused before anything is allocated.
    let mut huge = encode_state(&sample());
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode_state(p, &huge).is_err());
}

#[test]
fn manifest_round_trips_and_edits_fail_its_checksum() {
    let p = Path::new("ck/manifest.json");
    let bytes = encode_manifest(&manifest());
    assert_eq!(decode_manifest(p, &bytes).unwrap(), manifest());
    let text = String::from_utf8(bytes).unwrap();
    let edited = text.replace("268435456", "268435457");
    assert_ne!(edited, text);
    let e = decode_manifest(p, edited.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("manifest.json") && e.contains("checksum"), "{e}");
    let e = decode_manifest(p, &text.as_bytes()[..text.len() / 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not JSON") && e.contains("offset"), "{e}");
}
