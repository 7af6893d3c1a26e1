//! Golden tests: structures written by Windows 10 (libvhdi's test fragments) decode to the
//! values Windows meant.

use vhdx::format::{
    crc_with_zeroed, from_utf16le, guids, parse_metadata_table, read_padded, Header,
    MetadataTableHeader, ParentLocator, ParentLocatorEntry, ParentLocatorHeader, RegionTable,
    RegionTableHeader, HEADER_SIGNATURE, MIB,
};

fn fragment(name: &str) -> Option<Vec<u8>> {
    let dir = vhdkit_tests::test_images_dir();
    if dir.is_none() {
        // image_or_skip prints the reason (and fails in CI).
        vhdkit_tests::image_or_skip(format!("libvhdi-fragments/{name}"))?;
    }
    Some(std::fs::read(dir?.join("libvhdi-fragments").join(name)).unwrap())
}

#[test]
fn windows_file_identifier_names_its_creator() {
    let Some(b) = fragment("file_identifier.1") else {
        return;
    };
    assert_eq!(&b[..8], b"vhdxfile");
    assert_eq!(from_utf16le(&b[8..]), "Microsoft Windows 10.0.19041.0");
}

#[test]
fn windows_header_decodes_and_its_crc32c_verifies() {
    let Some(b) = fragment("image_header.1") else {
        return;
    };
    let h = Header::parse(&b);
    assert_eq!(h.signature, HEADER_SIGNATURE);
    assert_eq!(
        h.checksum,
        crc_with_zeroed(&b, 4),
        "CRC-32C over 4 KiB with the field zeroed"
    );
    assert_eq!(h.sequence_number, 6);
    assert!(h.log_guid.is_nil());
    assert_eq!((h.log_offset, h.log_length), (MIB, MIB as u32));
    assert!(h.problems().is_empty());
    // Re-encoding gives the same bytes.
    assert_eq!(h.to_bytes(), b);
}

#[test]
fn windows_region_table_places_metadata_and_bat_as_required() {
    let Some(b) = fragment("region_table.1") else {
        return;
    };
    let mut full = b.clone();
    full.resize(64 << 10, 0);
    let t = RegionTable::parse(&full).unwrap();
    assert_eq!(t.entries.len(), 2);
    let bat = t
        .entries
        .iter()
        .find(|e| e.guid == guids::BAT_REGION)
        .unwrap();
    let meta = t
        .entries
        .iter()
        .find(|e| e.guid == guids::METADATA_REGION)
        .unwrap();
    assert_eq!(bat.file_offset, 3 * MIB);
    assert_eq!(meta.file_offset, 2 * MIB);
    assert!(bat.required && meta.required);
    let Some(entry) = fragment("region_table_entry.1") else {
        return;
    };
    assert_eq!(entry, b[16..48]);
    let Some(header) = fragment("region_table_header.1") else {
        return;
    };
    assert_eq!(
        read_padded::<RegionTableHeader>(&header).entry_count.get(),
        2
    );
}

#[test]
fn windows_metadata_table_lists_file_parameters_first() {
    let Some(h) = fragment("metadata_table_header.1") else {
        return;
    };
    let Some(e) = fragment("metadata_table_entry.1") else {
        return;
    };
    let mut table = h.clone();
    table.extend_from_slice(&e);
    table.resize(64 << 10, 0);
    assert_eq!(read_padded::<MetadataTableHeader>(&h).entry_count.get(), 5);
    let entries = parse_metadata_table(&table).unwrap();
    assert_eq!(entries[0].item_id, guids::FILE_PARAMETERS);
    assert_eq!((entries[0].offset, entries[0].length), (64 << 10, 8));
    assert!(entries[0].is_required && !entries[0].is_virtual_disk && !entries[0].is_user);
}

#[test]
fn windows_parent_locator_header_and_linkage_entry_decode() {
    let Some(h) = fragment("parent_locator_header.1") else {
        return;
    };
    let Some(e) = fragment("parent_locator_entry.1") else {
        return;
    };
    let header: ParentLocatorHeader = read_padded(&h);
    assert_eq!(header.locator_type.get(), guids::PARENT_LOCATOR_TYPE);
    assert_eq!(header.key_value_count.get(), 5);
    // The parent_linkage entry: key 28 bytes ("parent_linkage" in UTF-16), value 76 bytes
    // ("{GUID}" with braces).
    let entry: ParentLocatorEntry = read_padded(&e);
    assert_eq!((entry.key_length.get(), entry.value_length.get()), (28, 76));
    // A locator built the same way round-trips through our parser with those lengths.
    let loc = ParentLocator {
        locator_type: guids::PARENT_LOCATOR_TYPE,
        entries: vec![(
            "parent_linkage".into(),
            "{83ee2b4a-1ab1-4a7c-a6a9-f0d4ab7f5b43}".into(),
        )],
    };
    let bytes = loc.to_bytes();
    let first: ParentLocatorEntry = read_padded(&bytes[20..]);
    assert_eq!((first.key_length.get(), first.value_length.get()), (28, 76));
}
