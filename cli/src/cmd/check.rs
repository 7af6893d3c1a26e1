//! `vhdtool check [--repair] [--json] FILE`: structural check (and repair) of an image.
//!
//! Exit codes, as qemu-img: 0 clean, 2 corruption found, 3 only leaks found, 1 the file could
//! not be checked. Raw files have no structure: "nothing to check", exit 0. For differencing
//! images the parent link is verified too (parent found, UUID matches, its own chain opens);
//! a broken link is a corruption finding, not a failure to check.
//!
//! Leaks are file space `--repair` or `compact` can give back. Free VHDX space that is part of
//! its creator's layout (qemu-img's reserve after the regions) or that nothing in place could
//! reclaim is information, not a finding: `--json` lists it under `unused`, the text stays
//! quiet about it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use block_backend::{CheckReport, Finding, Format, Unused};
use serde::Serialize;

use crate::size::format_size;

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub share: super::ShareArgs,
    /// Repair what can be repaired without losing data.
    #[arg(long, short = 'r')]
    pub repair: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The image.
    pub file: PathBuf,
}

/// What `check --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The file as given.
    pub filename: PathBuf,
    /// `raw`, `vhd` or `vhdx`.
    pub format: String,
    /// `clean`, `leaks` or `corrupt` (after repairs, with --repair).
    pub result: &'static str,
    /// Problems that may lose or corrupt data.
    pub corruptions: Vec<Finding>,
    /// Wasted space that harms no data.
    pub leaks: Vec<Finding>,
    /// Total leaked bytes.
    pub leaked_bytes: u64,
    /// Free file space that is no leak (information: not counted in the result).
    pub unused: Vec<Unused>,
    /// Total bytes of `unused`.
    pub unused_bytes: u64,
    /// Problems found before repairing (with --repair).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub found_before_repair: Vec<Finding>,
    /// What --repair did.
    pub repairs: Vec<String>,
    /// The exit code.
    pub exit_code: u8,
}

/// Runs `check`.
pub fn run(a: &Args) -> Result<u8> {
    let (format, report) = check_image(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report, format));
    }
    Ok(report.exit_code)
}

/// Checks (and with `--repair` repairs) the image through the probe point, then its parent link.
fn check_image(a: &Args) -> Result<(Format, Report)> {
    let path = &a.file;
    if a.repair && a.share.force_share {
        anyhow::bail!("--force-share only reads: it cannot be combined with --repair");
    }
    let opts = a.share.open_options(path);
    let checked = |r: block_backend::Result<(Format, CheckReport)>, what: &str| {
        r.with_context(|| format!("cannot {what} {}", path.display()))
    };
    let mut found_before_repair = Vec::new();
    let (format, report) = if a.repair {
        let (_, before) = checked(block_backend::check(path, opts.mode()), "check")?;
        found_before_repair.extend(before.corruptions);
        found_before_repair.extend(before.leaks);
        checked(block_backend::repair(path), "repair")?
    } else {
        checked(block_backend::check(path, opts.mode()), "check")?
    };
    let CheckReport {
        mut corruptions,
        leaks,
        leaked_bytes,
        unused,
        repairs,
    } = report;
    if format != Format::Raw {
        if let Some(f) = parent_link_finding(path, opts)? {
            corruptions.push(f);
        }
    }
    let (result, exit_code) = if !corruptions.is_empty() {
        ("corrupt", 2)
    } else if !leaks.is_empty() {
        ("leaks", 3)
    } else {
        ("clean", 0)
    };
    let report = Report {
        filename: path.clone(),
        format: format.to_string(),
        result,
        corruptions,
        leaks,
        leaked_bytes,
        unused_bytes: unused.iter().map(|u| u.length).sum(),
        unused,
        found_before_repair,
        repairs,
        exit_code,
    };
    Ok((format, report))
}

/// For a differencing image that opens on its own: a finding if its chain does not. A layer in
/// use by another process is an error (the check could not be done), not a finding.
fn parent_link_finding(
    path: &std::path::Path,
    opts: block_backend::OpenOptions,
) -> Result<Option<Finding>> {
    let in_use = |e: block_backend::Error| -> Result<Option<Finding>> {
        if e.kind() == block_backend::ErrorKind::InUse {
            Err(e.into())
        } else {
            Ok(None)
        }
    };
    // If the image itself does not open, the structural findings already say why.
    let image = match block_backend::open_layer(path, opts.mode()) {
        Ok(i) => i,
        Err(e) => return in_use(e),
    };
    if image.info().parent_uuid.is_none() {
        return Ok(None);
    }
    drop(image);
    match block_backend::open(path, opts) {
        Ok(_) => Ok(None),
        Err(e) if e.kind() == block_backend::ErrorKind::InUse => Err(e.into()),
        Err(e) => Ok(Some(Finding {
            structure: "parent link".into(),
            offset: 0,
            message: e.to_string(),
        })),
    }
}

fn human(r: &Report, format: Format) -> String {
    let mut s = String::new();
    if format == Format::Raw {
        s.push_str(&format!(
            "{}: raw image, nothing to check.\n",
            r.filename.display()
        ));
        return s;
    }
    if !r.found_before_repair.is_empty() {
        s.push_str("Found before repair:\n");
        for f in &r.found_before_repair {
            s.push_str(&format!(
                "  {} at offset {}: {}\n",
                f.structure, f.offset, f.message
            ));
        }
    }
    for rep in &r.repairs {
        s.push_str(&format!("Repaired: {rep}\n"));
    }
    for f in &r.corruptions {
        s.push_str(&format!("ERROR {}\n", describe(f, &r.filename)));
    }
    for f in &r.leaks {
        s.push_str(&format!("Leaked {}\n", describe(f, &r.filename)));
    }
    if !r.repairs.is_empty() {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired: {}\n",
            r.repairs.len()
        ));
    }
    match r.result {
        "clean" => s.push_str("No errors were found on the image.\n"),
        _ => {
            if !r.corruptions.is_empty() {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    r.corruptions.len()
                ));
            }
            if !r.leaks.is_empty() {
                s.push_str(&format!(
                    "\n{} leaked ranges ({}) were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    r.leaks.len(),
                    format_size(r.leaked_bytes)
                ));
            }
        }
    }
    s
}

/// `structure at offset N: message`, without the file name and location the format crate's
/// message may already start with.
fn describe(f: &Finding, file: &std::path::Path) -> String {
    let location = format!("{} at offset {}", f.structure, f.offset);
    let prefix = format!("{}: {location}: ", file.display());
    let message = f.message.strip_prefix(&prefix).unwrap_or(&f.message);
    format!("{location}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_do_not_repeat_file_and_location() {
        let f = Finding {
            structure: "footer".into(),
            offset: 512,
            message: "a.vhd: footer at offset 512: checksum mismatch".into(),
        };
        assert_eq!(
            describe(&f, std::path::Path::new("a.vhd")),
            "footer at offset 512: checksum mismatch"
        );
        let g = Finding {
            structure: "parent link".into(),
            offset: 0,
            message: "a.vhd: parent image 'b.vhd' not found".into(),
        };
        assert_eq!(
            describe(&g, std::path::Path::new("a.vhd")),
            "parent link at offset 0: a.vhd: parent image 'b.vhd' not found"
        );
    }
}
