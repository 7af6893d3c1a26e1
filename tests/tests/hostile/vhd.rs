//! Damage to VHD files: truncations, flipped and re-sealed footer and dynamic header fields, BAT
//! entries pointing anywhere, malformed parent names.

use super::*;

pub(crate) fn vhd_cases(tag: &str, name: &str, b: &[u8]) -> Vec<Case> {
    let l = v::Layout::of(b);
    let mut cases = Vec::new();
    let mut c = |n: String, bytes: Vec<u8>, e: Expect| {
        cases.push(Case::one(format!("{tag}-{n}"), name, bytes, e))
    };
    // Truncations at every structure boundary.
    let mut points = vec![
        0,
        1,
        8,
        511,
        512,
        513,
        l.len / 2,
        l.len - 512,
        l.len - 511,
        l.len - 1,
    ];
    if l.dynamic {
        points.extend([
            1023,
            1024,
            l.header + 512,
            l.header + 1024,
            l.bat,
            l.bat + 2 * l.entries,
        ]);
        points.push((l.bat + 4 * l.entries).next_multiple_of(512));
        for loc in &l.locators {
            points.extend([loc.data_offset as usize, loc.data_offset as usize + 1]);
        }
        if let Some((_, sector)) = l.first_allocated(b) {
            let at = sector as usize * 512;
            points.extend([at, at + 512, at + 512 + l.block_size as usize / 2]);
        }
    }
    for case in truncations(tag, name, b, points) {
        c(
            case.name[tag.len() + 1..].to_string(),
            case.files[0].1.clone(),
            case.expect,
        );
    }
    // Flipped bytes in every footer and header field (checksums left stale: must be noticed).
    let footer_fields = [
        0, 8, 12, 16, 24, 28, 32, 36, 40, 48, 56, 60, 64, 68, 84, 100,
    ];
    for f in footer_fields {
        // A fixed image whose footer cookie is gone is a raw file, indistinguishable from one.
        let e = if f == 0 && !l.dynamic {
            Expect::Any
        } else {
            Expect::Detected
        };
        c(format!("footer-byte-{f}-flipped"), flip(b, l.footer + f), e);
        if l.dynamic {
            c(
                format!("footer-copy-byte-{f}-flipped"),
                flip(b, f),
                Expect::Detected,
            );
        }
    }
    // Re-sealed values in every footer size/offset/type field.
    let huge64: [(&str, u64); 5] = [
        ("zero", 0),
        ("one", 1),
        ("odd", 511),
        ("max", u64::MAX),
        ("past-eof", l.len as u64 * 1000),
    ];
    for (what, val) in huge64 {
        for (field, fname) in [
            (v::F_DATA_OFFSET, "data-offset"),
            (v::F_ORIGINAL_SIZE, "original-size"),
            (v::F_CURRENT_SIZE, "current-size"),
        ] {
            c(
                format!("footer-{fname}-{what}"),
                with(b, |x| l.set_footer(x, field, &val.to_be_bytes())),
                Expect::Any,
            );
        }
    }
    for (what, val) in [
        ("zero", 0u32),
        ("max", u32::MAX),
        ("fixed", 2),
        ("dynamic", 3),
        ("differencing", 4),
        ("five", 5),
    ] {
        c(
            format!("footer-disk-type-{what}"),
            with(b, |x| l.set_footer(x, v::F_DISK_TYPE, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u32), ("max", u32::MAX), ("tiny", 0x0001_0101)] {
        c(
            format!("footer-geometry-{what}"),
            with(b, |x| l.set_footer(x, v::F_GEOMETRY, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    if !l.dynamic {
        return cases;
    }
    let h = l.header;
    for f in [
        0, 8, 16, 24, 28, 32, 36, 40, 56, 64, 300, 576, 580, 584, 592,
    ] {
        c(
            format!("header-byte-{f}-flipped"),
            flip(b, h + f),
            Expect::Detected,
        );
    }
    for (what, val) in huge64
        .into_iter()
        .chain([("header-itself", h as u64), ("footer-copy", 0)])
    {
        c(
            format!("header-table-offset-{what}"),
            with(b, |x| {
                l.set_header(x, v::H_TABLE_OFFSET, &val.to_be_bytes())
            }),
            Expect::Any,
        );
        c(
            format!("header-data-offset-{what}"),
            with(b, |x| l.set_header(x, v::H_DATA_OFFSET, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [
        ("zero", 0u32),
        ("one", 1),
        ("one-more", l.entries as u32 + 1),
        ("thousandfold", l.entries as u32 * 1000),
        ("max", u32::MAX),
    ] {
        c(
            format!("header-max-entries-{what}"),
            with(b, |x| l.set_header(x, v::H_MAX_ENTRIES, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [
        ("zero", 0u32),
        ("one", 1),
        ("sector", 512),
        ("not-power-of-two", 3 << 16),
        ("2g", 1 << 31),
        ("max", u32::MAX),
        ("half", l.block_size as u32 / 2),
        ("double", l.block_size as u32 * 2),
    ] {
        c(
            format!("header-block-size-{what}"),
            with(b, |x| l.set_header(x, v::H_BLOCK_SIZE, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    for (what, val) in [("zero", 0u32), ("two", 2 << 16)] {
        c(
            format!("header-version-{what}"),
            with(b, |x| l.set_header(x, v::H_VERSION, &val.to_be_bytes())),
            Expect::Any,
        );
    }
    // Malformed UTF-16 parent names: an unpaired surrogate, odd garbage, no terminator.
    for (what, bytes) in [
        ("unpaired-surrogate", vec![0xD8, 0x00, 0x00, 0x41]),
        ("lone-low-surrogate", vec![0xDC, 0x00]),
        ("all-ff", vec![0xFF; 512]),
        ("no-terminator", pattern(8, 512)),
    ] {
        c(
            format!("parent-name-{what}"),
            with(b, |x| l.set_header(x, v::H_PARENT_NAME, &bytes)),
            Expect::Any,
        );
    }
    // Parent locators: fields and data.
    for (i, loc) in l.locators.iter().enumerate() {
        let e = loc.entry_at - h;
        for (what, val) in [
            ("zero", 0u64),
            ("past-eof", l.len as u64 + 4096),
            ("max", u64::MAX),
            ("header", h as u64),
            ("odd", 1001),
        ] {
            c(
                format!("locator{i}-offset-{what}"),
                with(b, |x| l.set_header(x, e + 16, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [
            ("zero", 0u32),
            ("one", 1),
            ("odd", 7),
            ("max", u32::MAX),
            ("space-plus-one", loc.space + 1),
        ] {
            c(
                format!("locator{i}-length-{what}"),
                with(b, |x| l.set_header(x, e + 8, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        for (what, val) in [("zero", 0u32), ("max", u32::MAX), ("tiny", 1)] {
            c(
                format!("locator{i}-space-{what}"),
                with(b, |x| l.set_header(x, e + 4, &val.to_be_bytes())),
                Expect::Any,
            );
        }
        c(
            format!("locator{i}-code-unknown"),
            with(b, |x| l.set_header(x, e, b"XXXX")),
            Expect::Any,
        );
        let d = loc.data_offset as usize;
        c(
            format!("locator{i}-data-unpaired-surrogate"),
            with(b, |x| {
                x[d..d + 4].copy_from_slice(&[0x00, 0xD8, 0x41, 0x00])
            }),
            Expect::Any,
        );
        c(
            format!("locator{i}-data-garbage"),
            with(b, |x| {
                x[d..d + loc.length as usize].copy_from_slice(&pattern(9, loc.length as usize))
            }),
            Expect::Any,
        );
    }
    // BAT entries past EOF, over metadata, over each other.
    if let Some((i, sector)) = l.first_allocated(b) {
        let at = l.bat_entry(i);
        for (what, val, e) in [
            ("past-eof", (l.len / 512 + 100) as u32, Expect::Detected),
            ("at-the-end", (l.len / 512 - 1) as u32, Expect::Detected),
            ("max-minus-one", u32::MAX - 1, Expect::Detected),
            ("over-footer-copy", 0, Expect::Detected),
            ("over-header", (h / 512) as u32, Expect::Detected),
            ("over-bat", (l.bat / 512) as u32, Expect::Detected),
            ("misaligned", sector + 1, Expect::Any),
        ] {
            c(
                format!("bat-entry-{i}-{what}"),
                with(b, |x| x[at..at + 4].copy_from_slice(&val.to_be_bytes())),
                e,
            );
        }
        for j in 0..l.entries.min(64) {
            if j != i && v::be32(b, l.bat_entry(j)) == u32::MAX {
                let bj = l.bat_entry(j);
                c(
                    format!("bat-entries-{i}-and-{j}-overlap"),
                    with(b, |x| x[bj..bj + 4].copy_from_slice(&sector.to_be_bytes())),
                    Expect::Detected,
                );
                break;
            }
        }
        c(
            format!("bat-entry-{i}-byte-flipped"),
            flip(b, at),
            Expect::Detected,
        );
        let bitmap = sector as usize * 512;
        c("bitmap-byte-flipped".into(), flip(b, bitmap), Expect::Any);
        c(
            "bitmap-all-ones".into(),
            with(b, |x| x[bitmap..bitmap + 512].fill(0xFF)),
            Expect::Any,
        );
    }
    let last = l.bat_entry(l.entries - 1);
    c(
        "bat-last-entry-past-eof".into(),
        with(b, |x| {
            x[last..last + 4].copy_from_slice(&((l.len / 512) as u32 + 8).to_be_bytes())
        }),
        Expect::Detected,
    );
    cases
}
