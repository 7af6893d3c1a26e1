//! Damage to VHDX files: truncations, flipped and re-sealed header, region and metadata fields,
//! BAT entries pointing anywhere, and log entries whose descriptors point anywhere.

use super::*;

pub(crate) fn vhdx_cases(tag: &str, name: &str, b: &[u8]) -> Vec<Case> {
    let l = x::Layout::of(b);
    let mut cases = Vec::new();
    let mut c = |n: String, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("{tag}-{n}"), name, bytes, e))
    };
    let mib = 1usize << 20;
    let points = [
        0,
        7,
        8,
        (64 << 10) - 1,
        64 << 10,
        (64 << 10) + 100,
        128 << 10,
        192 << 10,
        256 << 10,
        320 << 10,
        l.log_offset,
        l.log_offset + l.log_length / 2,
        l.metadata,
        l.metadata + (64 << 10),
        l.bat,
        l.bat + 4096,
        l.bat + l.bat_len,
        4 * mib + mib / 2,
        l.len - mib,
        l.len - 1,
    ];
    for case in truncations(tag, name, b, points) {
        c(
            case.name[tag.len() + 1..].to_string(),
            case.files[0].1.clone(),
            case.expect,
        );
    }
    c("identifier-flipped".into(), flip(b, 0), Expect::Unusable);
    c(
        "creator-garbage".into(),
        with(b, |x| x[8..520].copy_from_slice(&pattern(2, 512))),
        Expect::Any,
    );
    // Header fields: one copy flipped (the other may serve), both flipped (must be noticed).
    let fields = [0, 4, 8, 16, 32, 48, 64, 66, 68, 72, 100, 4095];
    for f in fields {
        for (i, h) in x::HEADERS.iter().enumerate() {
            c(
                format!("header{i}-byte-{f}-flipped"),
                flip(b, h + f),
                Expect::Any,
            );
        }
        c(
            format!("both-headers-byte-{f}-flipped"),
            with(b, |y| x::HEADERS.iter().for_each(|h| y[h + f] ^= 0xFF)),
            Expect::Detected,
        );
    }
    let log_guid = x::guid("11111111-2222-3333-4444-555555555555");
    for (what, len) in [
        ("zero", 0u32),
        ("one", 1),
        ("sector", 4096),
        ("max", u32::MAX),
    ] {
        c(
            format!("header-log-length-{what}-with-log-guid"),
            with(b, |y| {
                l.set_header(y, x::H_LOG_GUID, &log_guid);
                l.set_header(y, x::H_LOG_LENGTH, &len.to_le_bytes());
            }),
            Expect::Any,
        );
    }
    for (what, off) in [
        ("zero", 0u64),
        ("header", 64 << 10),
        ("metadata", l.metadata as u64),
        ("past-eof", l.len as u64),
        ("max", u64::MAX - 4095),
    ] {
        c(
            format!("header-log-offset-{what}-with-log-guid"),
            with(b, |y| {
                l.set_header(y, x::H_LOG_GUID, &log_guid);
                l.set_header(y, x::H_LOG_OFFSET, &off.to_le_bytes());
            }),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u16), ("two", 2), ("max", u16::MAX)] {
        c(
            format!("header-version-{what}"),
            with(b, |y| l.set_header(y, x::H_VERSION, &val.to_le_bytes())),
            Expect::Any,
        );
        c(
            format!("header-log-version-{what}"),
            with(b, |y| l.set_header(y, x::H_LOG_VERSION, &val.to_le_bytes())),
            Expect::Any,
        );
    }
    c(
        "header-sequence-max".into(),
        with(b, |y| {
            l.set_header(y, x::H_SEQUENCE, &u64::MAX.to_le_bytes())
        }),
        Expect::Any,
    );
    // Region tables.
    for f in [0, 4, 8, 16, 32, 40, 44] {
        c(
            format!("region-table0-byte-{f}-flipped"),
            flip(b, x::REGIONS[0] + f),
            Expect::Any,
        );
        c(
            format!("both-region-tables-byte-{f}-flipped"),
            with(b, |y| x::REGIONS.iter().for_each(|r| y[r + f] ^= 0xFF)),
            Expect::Detected,
        );
    }
    for (what, n) in [
        ("zero", 0u32),
        ("one", 1),
        ("three", 3),
        ("2048", 2048),
        ("max", u32::MAX),
    ] {
        c(
            format!("region-count-{what}"),
            with(b, |y| l.set_regions(y, x::R_COUNT, &n.to_le_bytes())),
            Expect::Any,
        );
    }
    for (region, id) in [("bat", x::BAT_GUID), ("metadata", x::METADATA_GUID)] {
        let e = l.region_entry(b, id);
        for (what, off) in [
            ("zero", 0u64),
            ("over-log", l.log_offset as u64),
            ("over-metadata", l.metadata as u64),
            ("over-bat", l.bat as u64),
            ("past-eof", (l.len + mib) as u64),
            ("max", u64::MAX - (mib as u64 - 1)),
            ("misaligned", l.bat as u64 + 4096),
        ] {
            c(
                format!("region-{region}-offset-{what}"),
                with(b, |y| l.set_regions(y, e + 16, &off.to_le_bytes())),
                Expect::Any,
            );
        }
        for (what, len) in [
            ("zero", 0u32),
            ("one", 1),
            ("max", u32::MAX - (mib as u32 - 1)),
            ("huge", 1 << 30),
        ] {
            c(
                format!("region-{region}-length-{what}"),
                with(b, |y| l.set_regions(y, e + 24, &len.to_le_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("region-{region}-unknown-required"),
            with(b, |y| l.set_regions(y, e, &[0x42; 16])),
            Expect::Unusable,
        );
    }
    // Metadata table and items (no checksum: values land as they are).
    let m = l.metadata;
    c(
        "metadata-signature-flipped".into(),
        flip(b, m),
        Expect::Unusable,
    );
    for (what, n) in [("zero", 0u16), ("2047", 2047), ("max", u16::MAX)] {
        c(
            format!("metadata-count-{what}"),
            with(b, |y| y[m + 10..m + 12].copy_from_slice(&n.to_le_bytes())),
            Expect::Any,
        );
    }
    for (i, (_, item)) in l.items.iter().enumerate() {
        let e = item.entry_at;
        for (what, val) in [
            ("zero", 0u32),
            ("table", 16),
            ("max", u32::MAX),
            ("past-region", 1 << 20),
        ] {
            c(
                format!("metadata-item{i}-offset-{what}"),
                with(b, |y| y[e + 16..e + 20].copy_from_slice(&val.to_le_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [("zero", 0u32), ("one", 1), ("max", u32::MAX)] {
            c(
                format!("metadata-item{i}-length-{what}"),
                with(b, |y| y[e + 20..e + 24].copy_from_slice(&val.to_le_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("metadata-item{i}-flags-flipped"),
            flip(b, e + 24),
            Expect::Any,
        );
        c(
            format!("metadata-item{i}-id-flipped"),
            flip(b, e),
            Expect::Any,
        );
    }
    let mut item_value = |id: &str, label: &str, values: &[(&str, Vec<u8>)]| {
        if let Some(it) = l.item(id) {
            for (what, val) in values {
                c(
                    format!("{label}-{what}"),
                    with(b, |y| y[it.at..it.at + val.len()].copy_from_slice(val)),
                    Expect::Any,
                );
            }
        }
    };
    item_value(
        x::FILE_PARAMETERS,
        "block-size",
        &[
            ("zero", 0u32.to_le_bytes().to_vec()),
            ("one", 1u32.to_le_bytes().to_vec()),
            ("not-power-of-two", (3u32 << 20).to_le_bytes().to_vec()),
            ("2g", (1u32 << 31).to_le_bytes().to_vec()),
            ("max", u32::MAX.to_le_bytes().to_vec()),
        ],
    );
    item_value(
        x::VIRTUAL_DISK_SIZE,
        "virtual-size",
        &[
            ("zero", 0u64.to_le_bytes().to_vec()),
            ("one", 1u64.to_le_bytes().to_vec()),
            ("odd", 4_194_305u64.to_le_bytes().to_vec()),
            ("max", u64::MAX.to_le_bytes().to_vec()),
            ("64t-plus", ((64u64 << 40) + 4096).to_le_bytes().to_vec()),
            ("huge-aligned", (1u64 << 62).to_le_bytes().to_vec()),
            ("double", (8u64 << 20).to_le_bytes().to_vec()),
        ],
    );
    for (id, label) in [
        (x::LOGICAL_SECTOR_SIZE, "logical-sector-size"),
        (x::PHYSICAL_SECTOR_SIZE, "physical-sector-size"),
    ] {
        item_value(
            id,
            label,
            &[
                ("zero", 0u32.to_le_bytes().to_vec()),
                ("1024", 1024u32.to_le_bytes().to_vec()),
                ("max", u32::MAX.to_le_bytes().to_vec()),
            ],
        );
    }
    if let Some(it) = l.item(x::FILE_PARAMETERS) {
        c(
            "file-parameters-flags-all".into(),
            with(b, |y| y[it.at + 4..it.at + 8].fill(0xFF)),
            Expect::Any,
        );
    }
    if let Some(it) = l.item(x::PARENT_LOCATOR) {
        let p = it.at;
        for (what, n) in [("zero", 0u16), ("max", u16::MAX), ("hundred", 100)] {
            c(
                format!("parent-locator-count-{what}"),
                with(b, |y| y[p + 18..p + 20].copy_from_slice(&n.to_le_bytes())),
                Expect::Any,
            );
        }
        let entries = x::le16(b, p + 18) as usize;
        for k in 0..entries {
            let e = p + 20 + 12 * k;
            for (what, val) in [("max", u32::MAX), ("past-item", it.len as u32), ("zero", 0)] {
                c(
                    format!("parent-locator-entry{k}-key-offset-{what}"),
                    with(b, |y| y[e..e + 4].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
                c(
                    format!("parent-locator-entry{k}-value-offset-{what}"),
                    with(b, |y| y[e + 4..e + 8].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
            }
            for (what, val) in [("max", u16::MAX), ("odd", 3), ("zero", 0)] {
                c(
                    format!("parent-locator-entry{k}-key-length-{what}"),
                    with(b, |y| y[e + 8..e + 10].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
                c(
                    format!("parent-locator-entry{k}-value-length-{what}"),
                    with(b, |y| y[e + 10..e + 12].copy_from_slice(&val.to_le_bytes())),
                    Expect::Any,
                );
            }
            let vo = p + x::le32(b, e + 4) as usize;
            let vl = x::le16(b, e + 10) as usize;
            c(
                format!("parent-locator-entry{k}-value-unpaired-surrogate"),
                with(b, |y| y[vo..vo + 2].copy_from_slice(&[0x00, 0xD8])),
                Expect::Any,
            );
            c(
                format!("parent-locator-entry{k}-value-garbage"),
                with(b, |y| {
                    y[vo..vo + vl].copy_from_slice(&pattern(k as u64, vl))
                }),
                Expect::Any,
            );
        }
    }
    // BAT entries.
    let entry = |i: usize| x::le64(b, l.bat + 8 * i);
    let n_entries = 16.min(l.bat_len / 8);
    if let Some(i) = (0..n_entries).find(|&i| entry(i) & 7 == 6 || entry(i) & 7 == 7) {
        let at = l.bat + 8 * i;
        let state = entry(i) & 7;
        let set = |off_mib: u64, st: u64| {
            with(b, |y| {
                y[at..at + 8].copy_from_slice(&((off_mib << 20) | st).to_le_bytes())
            })
        };
        for (what, off, e) in [
            ("past-eof", (l.len / mib + 10) as u64, Expect::Detected),
            ("half-past-eof", (l.len / mib) as u64, Expect::Detected),
            ("max", (1u64 << 44) - 1, Expect::Detected),
            ("zero", 0, Expect::Detected),
            ("over-log", (l.log_offset / mib) as u64, Expect::Detected),
            ("over-metadata", (l.metadata / mib) as u64, Expect::Detected),
            ("over-bat", (l.bat / mib) as u64, Expect::Detected),
        ] {
            c(format!("bat-entry-{i}-{what}"), set(off, state), e);
        }
        for st in [1u64, 3, 4, 5] {
            c(
                format!("bat-entry-{i}-state-{st}"),
                with(b, |y| y[at] = (y[at] & !7) | st as u8),
                Expect::Any,
            );
        }
        if let Some(j) = (0..n_entries)
            .find(|&j| j != i && entry(j) & 7 != 6 && entry(j) & 7 != 7 && j % 4097 != 4096)
        {
            let bj = l.bat + 8 * j;
            c(
                format!("bat-entries-{i}-and-{j}-overlap"),
                with(b, |y| {
                    y[bj..bj + 8].copy_from_slice(&entry(i).to_le_bytes())
                }),
                Expect::Detected,
            );
        }
        c(
            format!("bat-entry-{i}-state-byte-flipped"),
            flip(b, at),
            Expect::Any,
        );
        c(
            format!("bat-entry-{i}-offset-byte-flipped"),
            flip(b, at + 6),
            Expect::Detected,
        );
    }
    c(
        "bat-page-garbage".into(),
        with(b, |y| {
            y[l.bat..l.bat + 4096].copy_from_slice(&pattern(77, 4096))
        }),
        Expect::Detected,
    );
    cases
}

/// A log entry (our own writer, independent of the vhdx crate) for the log-damage cases.
pub(crate) enum Desc {
    Data { offset: u64, page: Vec<u8> },
    Zero { offset: u64, length: u64 },
}

pub(crate) struct EntryFields {
    sequence: u64,
    flushed: u64,
    last: u64,
    length_override: Option<u32>,
    count_override: Option<u32>,
}

pub(crate) fn log_entry(guid: &[u8; 16], descs: &[Desc], f: &EntryFields) -> Vec<u8> {
    let data_count = descs
        .iter()
        .filter(|d| matches!(d, Desc::Data { .. }))
        .count();
    let len = 4096 * (1 + data_count);
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&f.length_override.unwrap_or(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&0u32.to_le_bytes()); // tail: this entry (at log offset 0)
    e[16..24].copy_from_slice(&f.sequence.to_le_bytes());
    e[24..28].copy_from_slice(&f.count_override.unwrap_or(descs.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&f.flushed.to_le_bytes());
    e[56..64].copy_from_slice(&f.last.to_le_bytes());
    let mut sector = 1;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i;
        match d {
            Desc::Zero { offset, length } => {
                e[at..at + 4].copy_from_slice(b"zero");
                e[at + 8..at + 16].copy_from_slice(&length.to_le_bytes());
                e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
            }
            Desc::Data { offset, page } => {
                e[at..at + 4].copy_from_slice(b"desc");
                e[at + 4..at + 8].copy_from_slice(&page[4092..4096]);
                e[at + 8..at + 16].copy_from_slice(&page[0..8]);
                e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
                let s = 4096 * sector;
                sector += 1;
                e[s..s + 4].copy_from_slice(b"data");
                e[s + 4..s + 8].copy_from_slice(&((f.sequence >> 32) as u32).to_le_bytes());
                e[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
                e[s + 4092..s + 4096].copy_from_slice(&(f.sequence as u32).to_le_bytes());
            }
        }
        e[at + 24..at + 32].copy_from_slice(&f.sequence.to_le_bytes());
    }
    x::seal(&mut e, 0, len);
    e
}

/// A VHDX with a pending log holding `descs`, written as our writer would leave it after a
/// crash inside a flush.
pub(crate) fn pending_log(base: &[u8], descs: &[Desc], f: &EntryFields) -> Vec<u8> {
    let l = x::Layout::of(base);
    let guid = x::guid("AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE");
    let mut b = base.to_vec();
    let e = log_entry(&guid, descs, f);
    let n = e.len().min(l.log_length);
    b[l.log_offset..l.log_offset + n].copy_from_slice(&e[..n]);
    l.set_header(&mut b, x::H_LOG_GUID, &guid);
    b
}

pub(crate) fn log_cases(b: &[u8]) -> Vec<Case> {
    let l = x::Layout::of(b);
    let len = b.len() as u64;
    let bat_page = b[l.bat..l.bat + 4096].to_vec();
    let ok = EntryFields {
        sequence: 10,
        flushed: len,
        last: len,
        length_override: None,
        count_override: None,
    };
    let mut cases = Vec::new();
    let mut c = |n: &str, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("vhdx-log-{n}"), "log.vhdx", bytes, e))
    };
    let page = |o: u64| Desc::Data {
        offset: o,
        page: pattern(o, 4096),
    };
    c(
        "replays-its-bat-page",
        pending_log(
            b,
            &[Desc::Data {
                offset: l.bat as u64,
                page: bat_page.clone(),
            }],
            &ok,
        ),
        Expect::Any,
    );
    for (what, off) in [
        ("zero", 0u64),
        ("header", 64 << 10),
        ("region-table", 192 << 10),
        ("metadata", l.metadata as u64),
        ("bat", l.bat as u64),
        ("the-log-itself", l.log_offset as u64),
        ("past-eof", len + (1 << 20)),
        ("far-past-eof", 1 << 50),
        ("max", u64::MAX - 4095),
    ] {
        c(
            &format!("data-descriptor-at-{what}"),
            pending_log(b, &[page(off)], &ok),
            Expect::Any,
        );
    }
    for (what, off, length) in [
        ("whole-file", 0u64, len),
        ("past-eof", len, 1 << 20),
        ("huge", 4 << 20, 1 << 40),
        ("max", 0, u64::MAX - 4095),
        ("bat", l.bat as u64, 4096),
    ] {
        c(
            &format!("zero-descriptor-{what}"),
            pending_log(
                b,
                &[Desc::Zero {
                    offset: off,
                    length,
                }],
                &ok,
            ),
            Expect::Any,
        );
    }
    c(
        "many-descriptors",
        pending_log(
            b,
            &(0..100)
                .map(|i| page(l.bat as u64 + 4096 * (i % 3)))
                .collect::<Vec<_>>(),
            &ok,
        ),
        Expect::Any,
    );
    for (what, fields) in [
        (
            "flushed-offset-past-eof",
            EntryFields {
                flushed: len * 4,
                ..ok
            },
        ),
        (
            "last-offset-huge",
            EntryFields {
                last: 1 << 50,
                ..ok
            },
        ),
        (
            "last-offset-max",
            EntryFields {
                last: u64::MAX,
                ..ok
            },
        ),
        ("sequence-zero", EntryFields { sequence: 0, ..ok }),
        (
            "length-max",
            EntryFields {
                length_override: Some(u32::MAX),
                ..ok
            },
        ),
        (
            "length-past-log",
            EntryFields {
                length_override: Some(l.log_length as u32 + 4096),
                ..ok
            },
        ),
        (
            "count-max",
            EntryFields {
                count_override: Some(u32::MAX),
                ..ok
            },
        ),
        (
            "count-more",
            EntryFields {
                count_override: Some(2),
                ..ok
            },
        ),
    ] {
        c(
            &format!("entry-{what}"),
            pending_log(
                b,
                &[Desc::Data {
                    offset: l.bat as u64,
                    page: bat_page.clone(),
                }],
                &fields,
            ),
            Expect::Any,
        );
    }
    cases
}
