//! Parent chains that cycle, run 1,000 deep or lead to FIFOs and devices, and damaged real
//! images.

use super::*;

/// Replaces `from` by `to` (same length) wherever it appears in UTF-16, either byte order.
pub(crate) fn replace_utf16(b: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    for be in [false, true] {
        let enc = |t: &str| -> Vec<u8> {
            t.encode_utf16()
                .flat_map(|u| if be { u.to_be_bytes() } else { u.to_le_bytes() })
                .collect()
        };
        let (f, t) = (enc(from), enc(to));
        let mut k = 0;
        while k + f.len() <= b.len() {
            if b[k..k + f.len()] == f[..] {
                b[k..k + f.len()].copy_from_slice(&t);
                k += f.len();
            } else {
                k += 1;
            }
        }
    }
}

/// Writes `bytes` to `path` as a sparse file holding only the 4 KiB pages listed in `pages`
/// (the rest must be zeros).
pub(crate) fn write_pages(path: &Path, bytes: &[u8], pages: &[usize]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for &k in pages {
        let page = &bytes[k * 4096..((k + 1) * 4096).min(bytes.len())];
        f.write_all_at(page, k as u64 * 4096).unwrap();
    }
}

/// Indices of the 4 KiB pages of `bytes` that are not all zeros.
pub(crate) fn nonzero_pages(bytes: &[u8]) -> Vec<usize> {
    (0..bytes.len().div_ceil(4096))
        .filter(|&k| {
            bytes[k * 4096..((k + 1) * 4096).min(bytes.len())]
                .iter()
                .any(|&b| b != 0)
        })
        .collect()
}

/// A chain of `n` layers in `dir`: `l0000.<ext>` holds `base`, and each `l<i>` is a child of
/// `l<i-1>`. `vhdtool create` refuses parents whose chain is already too deep, so one child is
/// created over `l0000` and copied, each copy given its own identity (VHD footer UUID / VHDX
/// DataWriteGuid), the previous layer's as its parent link, and the previous layer's name in its
/// locators. Returns the layer paths, base first.
pub(crate) fn chain(dir: &Path, ext: &str, base: &[u8], n: usize) -> Vec<PathBuf> {
    let name = |i: usize| format!("l{i:04}.{ext}");
    let layers: Vec<PathBuf> = (0..n).map(|i| dir.join(name(i))).collect();
    write_pages(&layers[0], base, &nonzero_pages(base));
    let template_path = dir.join(format!("template.{ext}"));
    vhdtool_ok(&[
        "create".as_ref(),
        "--parent".as_ref(),
        layers[0].as_os_str(),
        template_path.as_os_str(),
    ]);
    let template = std::fs::read(&template_path).unwrap();
    std::fs::remove_file(&template_path).unwrap();
    // Copies differ from the template only inside pages that already hold data.
    let pages = nonzero_pages(&template);
    let identity = |i: usize| -> [u8; 16] {
        let mut id = *b"vhdkit-layer\0\0\0\0";
        id[12..].copy_from_slice(&(i as u32).to_be_bytes());
        id
    };
    if ext == "vhd" {
        let l = v::Layout::of(&template);
        let mut prev: Vec<u8> = base[base.len() - 512 + v::F_UUID..][..16].to_vec();
        for (i, path) in layers.iter().enumerate().skip(1) {
            let mut b = template.clone();
            replace_utf16(&mut b[l.header..l.header + 1024], &name(0), &name(i - 1));
            for loc in &l.locators {
                let d = loc.data_offset as usize;
                replace_utf16(&mut b[d..d + loc.length as usize], &name(0), &name(i - 1));
            }
            b[l.header + v::H_PARENT_UUID..][..16].copy_from_slice(&prev);
            v::seal(&mut b, l.header, 1024, v::H_CHECKSUM);
            l.set_footer(&mut b, v::F_UUID, &identity(i));
            prev = identity(i).to_vec();
            write_pages(path, &b, &pages);
        }
    } else {
        let l = x::Layout::of(&template);
        let it = l
            .item(x::PARENT_LOCATOR)
            .expect("a child has a parent locator");
        let link_text = |g: &[u8]| -> Vec<u8> {
            x::guid_text(g)
                .encode_utf16()
                .flat_map(|u| u.to_le_bytes())
                .collect()
        };
        let base_guid =
            &base[x::HEADERS[x::Layout::of(base).current] + x::H_DATA_WRITE_GUID..][..16];
        let original = link_text(base_guid);
        let mut prev = base_guid.to_vec();
        for (i, path) in layers.iter().enumerate().skip(1) {
            let mut b = template.clone();
            replace_utf16(&mut b[it.at..it.at + it.len], &name(0), &name(i - 1));
            let item = &mut b[it.at..it.at + it.len];
            let at = item
                .windows(original.len())
                .position(|w| w == &original[..])
                .expect("the parent_linkage value");
            item[at..at + original.len()].copy_from_slice(&link_text(&prev));
            l.set_header(&mut b, x::H_DATA_WRITE_GUID, &identity(i));
            prev = identity(i).to_vec();
            write_pages(path, &b, &pages);
        }
    }
    layers
}

#[test]
pub(crate) fn parent_chains_that_cycle_or_run_a_thousand_deep_fail_cleanly() {
    let f = fixtures();
    let mut cases = Vec::new();
    // A child that is its own parent: the parent UUID (VHD) / DataWriteGuid (VHDX) made to match
    // its own, stored under the name its locators give.
    let vl = v::Layout::of(&f.vhd_child);
    let own = f.vhd_child[vl.footer + v::F_UUID..vl.footer + v::F_UUID + 16].to_vec();
    let selfish = with(&f.vhd_child, |b| vl.set_header(b, v::H_PARENT_UUID, &own));
    cases.push(Case::one(
        "vhd-own-parent",
        "parent.vhd",
        selfish.clone(),
        Expect::Unusable,
    ));
    // Two children that are each other's parent: copies of one child (same UUID U, parent UUID
    // set to U), one named `parent.vhd` whose locators are renamed to `parenu.vhd`, the other
    // named `parenu.vhd` whose locators still say `parent.vhd`.
    let renamed = with(&selfish, |b| {
        replace_utf16(b, "parent.vhd", "parenu.vhd");
        v::seal(b, vl.header, 1024, v::H_CHECKSUM);
    });
    cases.push(Case {
        name: "vhd-two-children-parent-each-other".into(),
        files: vec![
            ("parent.vhd".into(), renamed),
            ("parenu.vhd".into(), selfish),
        ],
        target: "parent.vhd".into(),
        expect: Expect::Unusable,
        fifos: vec![],
    });
    // VHDX: the same with DataWriteGuid set to the parent_linkage the child carries.
    let xl = x::Layout::of(&f.vhdx_child);
    let it = xl
        .item(x::PARENT_LOCATOR)
        .expect("a child has a parent locator");
    let text: String = f.vhdx_child[it.at..it.at + it.len]
        .chunks_exact(2)
        .filter_map(|c| char::from_u32(u16::from_le_bytes([c[0], c[1]]) as u32))
        .collect();
    let brace = text.find('{').expect("parent_linkage value");
    let link = x::guid(&text[brace + 1..brace + 37]);
    let selfish = with(&f.vhdx_child, |b| {
        xl.set_header(b, x::H_DATA_WRITE_GUID, &link)
    });
    cases.push(Case::one(
        "vhdx-own-parent",
        "parent.vhdx",
        selfish.clone(),
        Expect::Unusable,
    ));
    let renamed = with(&selfish, |b| replace_utf16(b, "parent.vhdx", "parenu.vhdx"));
    cases.push(Case {
        name: "vhdx-two-children-parent-each-other".into(),
        files: vec![
            ("parent.vhdx".into(), renamed),
            ("parenu.vhdx".into(), selfish),
        ],
        target: "parent.vhdx".into(),
        expect: Expect::Unusable,
        fifos: vec![],
    });
    // Parents that are FIFOs, directories or devices.
    for (ext, child, name) in [
        ("vhd", &f.vhd_child, "parent.vhd"),
        ("vhdx", &f.vhdx_child, "parent.vhdx"),
    ] {
        cases.push(Case {
            name: format!("{ext}-parent-is-a-fifo"),
            files: vec![(format!("child.{ext}"), child.clone())],
            target: format!("child.{ext}"),
            expect: Expect::Unusable,
            fifos: vec![name.into()],
        });
    }
    run_all("chains", cases);

    // 1,000 layers: too deep to open (the limit is far below), each verb fails naming the chain;
    // a chain within the limit reads the base's data through every layer.
    for (ext, base) in [("vhd", &f.vhd_dynamic), ("vhdx", &f.vhdx_parent)] {
        let dir = vhdkit_tests::fresh_scratch_dir();
        let started = std::time::Instant::now();
        let layers = chain(&dir, ext, base, 1000);
        eprintln!(
            "{ext}: 1000-layer chain made in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let top = layers.last().unwrap();
        let names: Vec<String> = layers
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // The verbs can reach the 64 layers under the top and the 41 over the base.
        let reachable: Vec<&PathBuf> = layers[..41].iter().chain(&layers[1000 - 70..]).collect();
        let before: Vec<Vec<u8>> = reachable
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let out = dir.join("out.raw");
        for args in [
            vec!["info".as_ref(), "--json".as_ref(), top.as_os_str()],
            vec!["check".as_ref(), top.as_os_str()],
            vec![
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                top.as_os_str(),
                out.as_os_str(),
            ],
        ] {
            let o = vhdtool_bounded(&args);
            assert!(
                o.misbehaviour().is_none(),
                "{ext} 1000 deep {:?}: {:?}",
                args[0],
                o
            );
            // info describes the top file (its parent shown as not found); check and convert
            // must fail.
            if args[0] == "info" {
                assert!(
                    matches!(o.code, Some(0 | 1)),
                    "{ext} 1000 deep info exit {:?}",
                    o.code
                );
                continue;
            }
            assert!(
                matches!(o.code, Some(1 | 2)),
                "{ext} 1000 deep {:?} exit {:?}",
                args[0],
                o.code
            );
            let text = format!("{}{}", o.stdout, o.stderr);
            assert!(
                names.iter().any(|n| text.contains(n.as_str())),
                "{ext}: no file named: {text}"
            );
            assert!(
                text.contains("deep") || text.contains("chain"),
                "{ext}: no chain named: {text}"
            );
        }
        assert!(!out.exists(), "a failed convert left its output");
        let mid = &layers[40];
        let o = vhdtool_bounded(&[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            mid.as_os_str(),
            out.as_os_str(),
        ]);
        assert_eq!(
            o.code,
            Some(0),
            "{ext}: a 41-layer chain does not convert: {}",
            o.stderr
        );
        let flat = std::fs::read(&out).unwrap();
        assert_eq!(
            &flat[..4096],
            &pattern(if ext == "vhd" { 0 } else { 9 }, 4096)[..],
            "{ext}: base data not read through 40 layers"
        );
        for (p, b) in reachable.iter().zip(&before) {
            assert!(&std::fs::read(p).unwrap() == b, "{} changed", p.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
