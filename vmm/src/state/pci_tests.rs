//! The PCI half of the state: version choice, round trips, and every hostile shape refused
//! by name before anything is built from it.

use super::pci::{HotplugRegs, MsixEntryState, PciFunctionState, PciState};
use super::tests::{err, manifest, sample};
use super::*;
use crate::devices::msix::NO_VECTOR;

const P: &str = "ck/vmstate.bin";

/// A function in `slot` whose BAR0 decodes at `bar` (memory space on), for one queue.
fn function(slot: u8, bar: u32) -> PciFunctionState {
    let mut config = vec![0u8; 256];
    config[0x04] = 0x06;
    config[0x10..0x14].copy_from_slice(&bar.to_le_bytes());
    config[0x43] = 0x80; // MSI-X enabled
    PciFunctionState {
        slot,
        id: format!("disk{}", slot - 1),
        config,
        vectors: vec![0, 1],
        msix_table: vec![
            MsixEntryState {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x41,
                control: 0,
            };
            2
        ],
        msix_pending: vec![false, true],
    }
}

/// `sample()` with two disks on the pci transport, the second hot-added into slot 5 at a BAR
/// the guest moved.
fn pci_sample() -> VmState {
    let mut s = sample();
    s.transports.push(s.transports[0].clone());
    s.pci = Some(PciState {
        functions: vec![function(1, 0xe000_0000), function(5, 0xe010_0000)],
        hotplug: HotplugRegs {
            up: 1 << 5,
            down: 0,
            ejecting: 0,
        },
        next_id: 7,
    });
    s
}

fn refused(s: &VmState, want: &[&str]) {
    let bytes = encode_state(s);
    let (off, d) = err(decode_state(Path::new(P), &bytes).unwrap_err());
    assert_eq!(off, HEADER_LEN as u64, "{d}");
    let text = decode_state(Path::new(P), &bytes).unwrap_err().to_string();
    for w in want {
        assert!(text.contains(w), "{w:?} not in {text}");
    }
}

fn with_pci(f: impl FnOnce(&mut PciState)) -> VmState {
    let mut s = pci_sample();
    f(s.pci.as_mut().unwrap());
    s
}

#[test]
fn a_pci_state_round_trips_as_version_2_and_an_mmio_one_stays_version_1() {
    let bytes = encode_state(&pci_sample());
    assert_eq!(bytes[8], 2);
    let back = decode_state(Path::new(P), &bytes).unwrap();
    assert_eq!(back.pci, pci_sample().pci);
    assert_eq!(back.transports, pci_sample().transports);
    let mmio = encode_state(&sample());
    assert_eq!(mmio[8], 1);
    assert!(!String::from_utf8_lossy(&mmio).contains("\"pci\""));
    assert!(decode_state(Path::new(P), &mmio).unwrap().pci.is_none());
}

#[test]
fn pci_state_in_a_version_1_container_is_refused() {
    let mut bytes = encode_state(&pci_sample());
    bytes[8] = 1;
    let text = decode_state(Path::new(P), &bytes).unwrap_err().to_string();
    assert!(
        text.contains("version 1") && text.contains("pci state"),
        "{text}"
    );
}

#[test]
fn hostile_slots_ids_and_counts_are_refused_naming_the_function() {
    refused(
        &with_pci(|p| p.functions[1].slot = 0),
        &["pci function", "function 1 (slot 0)", "slot outside 1..=18"],
    );
    refused(
        &with_pci(|p| p.functions[1].slot = 19),
        &["pci function", "slot outside"],
    );
    refused(&with_pci(|p| p.functions[1].slot = 1), &["slot used twice"]);
    refused(
        &with_pci(|p| p.functions[1].id = "disk0".into()),
        &["used twice"],
    );
    refused(
        &with_pci(|p| p.functions[1].id = "disk9".into()),
        &["below the next id 7"],
    );
    refused(&with_pci(|p| p.functions[1].id = "disk04".into()), &["id"]);
    refused(&with_pci(|p| p.next_id = u64::MAX), &["next disk id"]);
    refused(
        &with_pci(|p| {
            p.functions.pop();
        }),
        &["1 PCI functions for 2 disks"],
    );
    refused(
        &with_pci(|p| p.functions[0].config.truncate(255)),
        &["pci config space", "255 bytes"],
    );
    let mut many = pci_sample();
    many.transports = vec![many.transports[0].clone(); crate::MAX_DISKS + 1];
    refused(&many, &["device state", "19 disks, a VM has at most 18"]);
}

#[test]
fn vectors_past_the_table_and_short_tables_are_refused() {
    refused(
        &with_pci(|p| p.functions[0].vectors[1] = 2),
        &[
            "msi-x state",
            "vector register 1 holds vector 2, past the table of 2",
        ],
    );
    // NO_VECTOR is "none", not an index.
    let mut ok = pci_sample();
    ok.pci.as_mut().unwrap().functions[0].vectors = vec![NO_VECTOR, NO_VECTOR];
    decode_state(Path::new(P), &encode_state(&ok)).unwrap();
    refused(
        &with_pci(|p| p.functions[0].msix_table.truncate(1)),
        &["msi-x state", "1 table entries"],
    );
    refused(
        &with_pci(|p| p.functions[0].msix_pending.push(false)),
        &["3 pending bits"],
    );
}

#[test]
fn bars_outside_the_window_or_overlapping_are_refused_only_while_decoding() {
    refused(
        &with_pci(|p| {
            p.functions[1].config[0x10..0x14].copy_from_slice(&0xd000_0000u32.to_le_bytes())
        }),
        &[
            "pci config space",
            "BAR0 decodes at 0xd0000000, outside the PCI window",
        ],
    );
    refused(
        &with_pci(|p| {
            p.functions[1].config[0x10..0x14].copy_from_slice(&0xefff_c000u32.to_le_bytes())
        }),
        &["outside the PCI window"],
    );
    refused(
        &with_pci(|p| {
            p.functions[1].config[0x10..0x14].copy_from_slice(&0xe000_0000u32.to_le_bytes())
        }),
        &["BAR0 at 0xe0000000 overlaps the BAR0 of slot 1"],
    );
    // With memory space off the BAR decodes nowhere: anything goes.
    let off = with_pci(|p| {
        p.functions[1].config[0x04] = 0;
        p.functions[1].config[0x10..0x14].copy_from_slice(&0xe000_0000u32.to_le_bytes());
    });
    decode_state(Path::new(P), &encode_state(&off)).unwrap();
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two_is_refused_on_either_transport() {
    for mut s in [sample(), pci_sample()] {
        s.transports[0].queues[0].size = 100;
        refused(&s, &["device state", "disk 0 virtqueue 0: size 100"]);
        s.transports[0].queues[0].size = 0;
        refused(&s, &["size 0"]);
    }
}

#[test]
fn the_manifest_transport_must_match_the_state() {
    let dir = Path::new("ck");
    let state = encode_state(&pci_sample());
    let mut m = manifest();
    m.disks.push(m.disks[0].clone());
    m.state.len = state.len() as u64;
    // A pci state under an mmio manifest.
    let e = decode_checkpoint(dir, &encode_manifest(&m), |_, _| Ok(state.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transport mmio") && e.contains("holds PCI"),
        "{e}"
    );
    // Transport pci needs a version 2 manifest.
    m.transport = crate::Transport::Pci;
    let e = decode_checkpoint(dir, &encode_manifest(&m), |_, _| Ok(state.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("transport pci in a version 1 manifest"), "{e}");
    m.version = 2;
    let (back, s) = decode_checkpoint(dir, &encode_manifest(&m), |_, _| Ok(state.clone())).unwrap();
    assert_eq!(back.transport, crate::Transport::Pci);
    assert_eq!(s.pci, pci_sample().pci);
    assert!(String::from_utf8_lossy(&encode_manifest(&m)).contains("\"transport\": \"pci\""));
    // An mmio manifest leaves the field out, as version 1 had it.
    assert!(!String::from_utf8_lossy(&encode_manifest(&manifest())).contains("transport"));
}
