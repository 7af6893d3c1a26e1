//! CHS disk geometry as stored in the VHD footer, and the spec's algorithm for choosing it.
//!
//! The algorithm (VHD spec 2006, appendix "CHS Calculation") rounds *down*: the CHS product never
//! exceeds the requested size. Real Windows images agree with it (40 MiB -> 963/5/17,
//! 1 GiB -> 2080/16/63, 4 MiB -> 120/4/17).

/// Cylinders / heads / sectors-per-track, as in footer bytes 56..60 (big-endian u16, u8, u8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of cylinders.
    pub cylinders: u16,
    /// Number of heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The largest geometry the field can hold (65535/16/255). Readers treat it as "use the
    /// current-size field", which is how Disk2vhd and qemu's `force_size` mark exact sizes.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// Geometry for a disk of `size` bytes by the spec's algorithm.
    pub fn for_size(size: u64) -> Geometry {
        let total = (size / 512).min(65535 * 16 * 255);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Number of 512-byte sectors the geometry addresses.
    pub fn sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64
    }

    /// Bytes the geometry addresses.
    pub fn bytes(&self) -> u64 {
        self.sectors() * 512
    }

    /// Decodes the 4-byte footer field.
    pub fn from_be_bytes(b: [u8; 4]) -> Geometry {
        Geometry {
            cylinders: u16::from_be_bytes([b[0], b[1]]),
            heads: b[2],
            sectors_per_track: b[3],
        }
    }

    /// Encodes the 4-byte footer field.
    pub fn to_be_bytes(self) -> [u8; 4] {
        let c = self.cylinders.to_be_bytes();
        [c[0], c[1], self.heads, self.sectors_per_track]
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.cylinders, self.heads, self.sectors_per_track
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_algorithm_matches_windows_made_images() {
        assert_eq!(Geometry::for_size(40 << 20).to_string(), "963/5/17");
        assert_eq!(Geometry::for_size(1 << 30).to_string(), "2080/16/63");
        assert_eq!(Geometry::for_size(4 << 20).to_string(), "120/4/17");
    }

    #[test]
    fn chs_product_never_exceeds_requested_size() {
        for mib in [1u64, 3, 40, 100, 1027, 4096, 127 * 1024, 2040 * 1024] {
            let g = Geometry::for_size(mib << 20);
            assert!(g.bytes() <= mib << 20, "{mib} MiB -> {g}");
        }
    }

    #[test]
    fn huge_sizes_clamp_to_the_largest_spec_geometry() {
        let g = Geometry::for_size(2040 << 30);
        assert_eq!((g.heads, g.sectors_per_track), (16, 255));
    }

    #[test]
    fn field_round_trips_big_endian() {
        let g = Geometry {
            cylinders: 0x1234,
            heads: 5,
            sectors_per_track: 17,
        };
        assert_eq!(g.to_be_bytes(), [0x12, 0x34, 5, 17]);
        assert_eq!(Geometry::from_be_bytes(g.to_be_bytes()), g);
    }
}
