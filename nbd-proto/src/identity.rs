//! What a vhdkit server says about the image behind an export, so a client can stack a local
//! differencing child on it: carried in the export description (`NBD_INFO_DESCRIPTION`, and
//! `NBD_OPT_LIST`), readable by people too (`nbdinfo` prints it).
//!
//! ```text
//!   vhdkit-image v1 format=vhdx identity=6f0c...-... sector=512 image=/srv/base.vhdx
//!   └─ marker ─┘ └┘ └────────── key=value tokens, any order ───┘ └─ image= takes the rest ─┘
//! ```
//!
//! - `format`: `raw`, `vhd` or `vhdx`, the container the served disk is stored in.
//! - `identity`: the UUID a differencing child records for its parent (VHD: the footer's unique
//!   id; VHDX: the DataWriteGuid), absent for raw images. It is the identity when the server
//!   started: a writable export that is then written (a VHDX gets a new DataWriteGuid) no longer
//!   matches it, so serve base images with `--read-only`.
//! - `sector`: logical sector size of the image.
//!
//! Unknown keys are skipped (later versions may add some); a description without the marker
//! (another server) describes no identity.

use uuid::Uuid;

/// The marker that starts a vhdkit description.
const MARKER: &str = "vhdkit-image v1 ";

/// The image behind an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageIdentity {
    /// `raw`, `vhd` or `vhdx`.
    pub format: String,
    /// Identity a differencing child records for its parent.
    pub identity: Option<Uuid>,
    /// Logical sector size.
    pub sector: u32,
    /// The image as the server names it (for people).
    pub image: String,
}

impl ImageIdentity {
    /// The description text.
    pub fn describe(&self) -> String {
        let mut s = format!("{MARKER}format={}", self.format);
        if let Some(id) = self.identity {
            s.push_str(&format!(" identity={id}"));
        }
        s.push_str(&format!(" sector={} image={}", self.sector, self.image));
        s
    }

    /// Reads a description; `None` when it is not a vhdkit one or is malformed.
    pub fn parse(description: &str) -> Option<ImageIdentity> {
        let mut rest = description.strip_prefix(MARKER)?;
        let mut id = ImageIdentity {
            format: String::new(),
            identity: None,
            sector: 512,
            image: String::new(),
        };
        while !rest.is_empty() {
            if let Some(image) = rest.strip_prefix("image=") {
                id.image = image.to_string();
                break;
            }
            let (token, after) = rest.split_once(' ').unwrap_or((rest, ""));
            rest = after;
            let (k, v) = token.split_once('=')?;
            match k {
                "format" => id.format = v.to_string(),
                "identity" => id.identity = Some(Uuid::parse_str(v).ok()?),
                "sector" => id.sector = v.parse().ok().filter(|s| [512, 4096].contains(s))?,
                _ => {}
            }
        }
        (!id.format.is_empty()).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_round_trips_with_spaces_in_the_image_name() {
        let id = ImageIdentity {
            format: "vhdx".into(),
            identity: Some(Uuid::new_v4()),
            sector: 4096,
            image: "/srv/my base.vhdx".into(),
        };
        assert_eq!(ImageIdentity::parse(&id.describe()), Some(id));
    }

    #[test]
    fn foreign_or_malformed_descriptions_carry_no_identity() {
        for d in [
            "/srv/base.vhdx",
            "vhdkit-image v1 identity=zz format=vhdx image=x",
            "vhdkit-image v1 sector=12 format=vhdx",
            "vhdkit-image v1 image=x",
        ] {
            assert_eq!(ImageIdentity::parse(d), None, "{d}");
        }
    }
}
