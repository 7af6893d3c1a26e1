//! Sizes on the command line and in output.
//!
//! Input: a byte count with an optional binary suffix, qemu-img style (`512`, `1K`, `64M`, `1G`,
//! `1T`; `K`/`KB`/`KiB` all mean 1024), an optional decimal fraction when the result is a whole
//! number of bytes (`1.5G`), or a hexadecimal byte count (`0x200000`). Output: `64 MiB`,
//! `1.5 GiB`.

/// Binary unit names, smallest first.
const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Parses a size such as `64M`, `1GiB`, `1.5G`, `4096` or `0x1000` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .map_err(|e| format!("invalid hexadecimal size {s:?}: {e}"));
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {other:?} (use K, M, G, T, P or E; 1K = 1024)"
            ))
        }
    };
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits_ok(int) || !digits_ok(frac) {
        return Err(format!(
            "invalid size {s:?}: expected a number with an optional suffix, like 64M or 1G"
        ));
    }
    if frac.len() > 18 {
        return Err(format!("invalid size {s:?}: too many decimal places"));
    }
    let too_large = || format!("size {s:?} is too large");
    let scale = 10u128.pow(frac.len() as u32);
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| too_large())?
    };
    let scaled = int_v
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_v))
        .and_then(|v| v.checked_mul(1u128 << shift))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// Formats a byte count for humans: `512 B`, `64 MiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut div = 1024u64;
    while unit + 1 < UNITS.len() && bytes / div >= 1024 {
        div <<= 10;
        unit += 1;
    }
    let value = bytes as f64 / div as f64;
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
    }

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
    }

    #[test]
    fn iec_and_b_spellings_are_accepted() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("3 MiB"), Ok(3 << 20));
    }

    #[test]
    fn fractions_must_give_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("0.1K").is_err());
    }

    #[test]
    fn hexadecimal_is_accepted() {
        assert_eq!(parse_size("0x200000"), Ok(2 << 20));
        assert_eq!(parse_size("0XfF"), Ok(255));
        assert!(parse_size("0x").is_err());
        assert!(parse_size("0xZZ").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "", " ", "K", "abc", "1X", "1.2.3K", "-1", "1 K K", "1e3", "..", "G1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(parse_size("16E").is_err());
        assert!(parse_size("99999999999999999999999").is_err());
        assert!(parse_size("18446744073709551616").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("0x1ffffffffffffffff").is_err());
    }

    #[test]
    fn sizes_format_with_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }
}
