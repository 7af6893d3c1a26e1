//! The stream decoder against good, truncated, corrupt, oversized and foreign input.

use super::*;

fn config() -> WireConfig {
    WireConfig {
        memory: 256 << 20,
        cpus: 2,
        cmdline: "quiet".into(),
        transport: crate::Transport::Pci,
        disks: vec![WireDisk {
            path: "/images/disk.vhdx".into(),
            read_only: false,
        }],
    }
}

fn records() -> Vec<Record> {
    vec![
        Record::Config(config()),
        Record::Pages {
            gpa: 0x10_0000,
            data: vec![0xab; 2 * PAGE],
        },
        Record::Zero {
            gpa: 0x20_0000,
            pages: 3,
        },
        Record::State(b"VHDKVMST...".to_vec()),
        Record::DisksReleased,
        Record::Ready,
        Record::Go,
    ]
}

fn stream() -> Vec<u8> {
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    for r in records() {
        s.extend_from_slice(&encode(&r));
    }
    s
}

fn err_text(bytes: &[u8]) -> String {
    decode_all(bytes).unwrap_err().to_string()
}

#[test]
fn every_record_round_trips_through_the_stream() {
    assert_eq!(decode_all(&stream()).unwrap(), records());
}

#[test]
fn the_sender_writes_what_the_receiver_reads_and_counts_offsets() {
    let mut out = Vec::new();
    let mut s = Sender::new(&mut out, "test");
    s.header().unwrap();
    s.pages(0x3000, &[7u8; PAGE]).unwrap();
    s.send(&Record::Go).unwrap();
    let sent = s.offset;
    assert_eq!(sent, out.len() as u64);
    let mut r = Receiver::new(&out[..], "test");
    r.header().unwrap();
    assert_eq!(
        r.record().unwrap(),
        Record::Pages {
            gpa: 0x3000,
            data: vec![7; PAGE]
        }
    );
    assert_eq!(r.record().unwrap(), Record::Go);
    assert_eq!(r.offset, sent);
}

#[test]
fn a_stream_cut_anywhere_is_an_error_naming_the_offset_never_a_panic() {
    let s = stream();
    for cut in 0..s.len() {
        let Err(e) = decode_all(&s[..cut]) else {
            // A cut between two records is a shorter valid stream.
            continue;
        };
        let t = e.to_string();
        assert!(
            t.contains("peer fuzz") && t.contains("offset"),
            "{cut}: {t}"
        );
    }
    let e = err_text(&s[..s.len() - 2]);
    assert!(
        e.contains("go record") || e.contains("record header"),
        "{e}"
    );
}

#[test]
fn a_flipped_bit_anywhere_is_caught() {
    let s = stream();
    for at in 0..s.len() {
        let mut bad = s.clone();
        bad[at] ^= 0x10;
        assert!(
            decode_all(&bad).is_err() || decode_all(&bad).unwrap() != records(),
            "flip at {at} went unnoticed"
        );
    }
    let mut bad = s.clone();
    let at = encode_header(PROTOCOL_VERSION, our_version()).len() + 20;
    bad[at] ^= 1;
    let e = err_text(&bad);
    assert!(e.contains("checksum mismatch") && e.contains("#1"), "{e}");
}

#[test]
fn another_protocol_or_vhdtool_version_is_refused_clearly() {
    let mut s = encode_header(PROTOCOL_VERSION + 1, our_version());
    s.extend_from_slice(&encode(&Record::Go));
    let e = err_text(&s);
    assert!(e.contains("refused") && e.contains("protocol 2"), "{e}");

    let s = encode_header(PROTOCOL_VERSION, "0.0.1-other");
    let e = err_text(&s);
    assert!(
        e.contains("refused") && e.contains("0.0.1-other") && e.contains(our_version()),
        "{e}"
    );
    let e = err_text(b"GET / HTTP/1.1\r\n\r\n");
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn oversized_and_unknown_records_are_refused_before_reading_them() {
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    let at = s.len() as u64;
    // A pages record announcing 4 GiB - 1 bytes, and nothing behind it.
    s.extend_from_slice(&2u32.to_le_bytes());
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = err_text(&s);
    assert!(
        e.contains("pages record") && e.contains("at most") && e.contains(&format!("{}", at + 4)),
        "{e}"
    );
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    s.extend_from_slice(&99u32.to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    assert!(err_text(&s).contains("unknown record kind 99"));
    // A control record with a payload.
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    s.extend_from_slice(&frame(K_GO, &[b"x"]));
    assert!(err_text(&s).contains("at most 0"));
    // An oversized version string.
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&1000u16.to_le_bytes());
    assert!(err_text(&h).contains("at most 64"));
}

#[test]
fn a_large_announced_record_that_never_comes_is_a_short_read() {
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    s.extend_from_slice(&K_STATE.to_le_bytes());
    s.extend_from_slice(&(32u32 << 20).to_le_bytes());
    s.extend_from_slice(b"only this");
    let e = err_text(&s);
    assert!(e.contains("announced, 9 came"), "{e}");
}

#[test]
fn malformed_page_records_are_refused() {
    for (payload, want) in [
        (vec![0u8; 8 + 100], "not a whole number of pages"),
        (vec![0u8; 8], "not a whole number of pages"),
        (
            [&5u64.to_le_bytes()[..], &[0u8; PAGE]].concat(),
            "unaligned",
        ),
    ] {
        let mut s = encode_header(PROTOCOL_VERSION, our_version());
        s.extend_from_slice(&frame(K_PAGES, &[&payload]));
        let e = err_text(&s);
        assert!(e.contains(want), "{e}");
    }
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    s.extend_from_slice(&frame(K_CONFIG, &[b"{\"memory\":1}"]));
    assert!(err_text(&s).contains("cannot be parsed"));
}

#[test]
fn a_failure_record_carries_the_peers_reason() {
    let mut s = encode_header(PROTOCOL_VERSION, our_version());
    s.extend_from_slice(&encode(&Record::Failed("disk /x: locked".into())));
    let e = err_text(&s);
    assert!(e.contains("failed: disk /x: locked"), "{e}");
}
