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
use block_backend::Format;
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

/// One problem, for output.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// Structure concerned (`"footer"`, `"BAT"`, `"parent link"`).
    pub structure: String,
    /// Byte offset of the structure in the file.
    pub offset: u64,
    /// What is wrong.
    pub message: String,
}

impl From<&vhd::Finding> for Finding {
    fn from(f: &vhd::Finding) -> Self {
        Finding {
            structure: f.structure.clone(),
            offset: f.offset,
            message: f.message.clone(),
        }
    }
}

impl From<&vhdx::Finding> for Finding {
    fn from(f: &vhdx::Finding) -> Self {
        Finding {
            structure: f.structure.clone(),
            offset: f.offset,
            message: f.message.clone(),
        }
    }
}

/// File space no structure uses that is not a leak (VHDX), for output: what the image's
/// creator left unused, or what nothing but `compact` or `convert` could give back.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Unused {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether `compact` gives it back.
    pub compact_releases: bool,
    /// Where it is and why it is there.
    pub message: String,
}

impl From<&vhdx::check::Unused> for Unused {
    fn from(u: &vhdx::check::Unused) -> Self {
        Unused {
            offset: u.offset,
            length: u.length,
            compact_releases: u.compact_releases,
            message: u.message.clone(),
        }
    }
}

/// A format crate's report, in the CLI's terms.
struct FormatReport {
    corruptions: Vec<Finding>,
    leaks: Vec<Finding>,
    leaked_bytes: u64,
    unused: Vec<Unused>,
    repairs: Vec<String>,
}

impl From<vhd::CheckReport> for FormatReport {
    fn from(r: vhd::CheckReport) -> Self {
        FormatReport {
            corruptions: r.corruptions.iter().map(Finding::from).collect(),
            leaks: r.leaks.iter().map(Finding::from).collect(),
            leaked_bytes: r.leaked_bytes,
            unused: vec![],
            repairs: r.repairs,
        }
    }
}

impl From<vhdx::CheckReport> for FormatReport {
    fn from(r: vhdx::CheckReport) -> Self {
        FormatReport {
            corruptions: r.corruptions.iter().map(Finding::from).collect(),
            leaks: r.leaks.iter().map(Finding::from).collect(),
            leaked_bytes: r.leaked_bytes,
            unused: r.unused.iter().map(Unused::from).collect(),
            repairs: r.repairs,
        }
    }
}

/// Runs the format's check (or repair) on `path`.
fn format_check(
    format: Format,
    path: &std::path::Path,
    repair: bool,
    mode: vhd::OpenMode,
) -> Result<FormatReport> {
    let what = if repair { "repair" } else { "check" };
    let r: Result<FormatReport, anyhow::Error> = match (format, repair) {
        (Format::Vhdx, false) => vhdx::check_with(path, mode)
            .map(Into::into)
            .map_err(Into::into),
        (Format::Vhdx, true) => vhdx::repair(path).map(Into::into).map_err(Into::into),
        (_, false) => vhd::check_with(path, mode)
            .map(Into::into)
            .map_err(Into::into),
        (_, true) => vhd::repair(path).map(Into::into).map_err(Into::into),
    };
    r.with_context(|| format!("cannot {what} {}", path.display()))
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
    let format = block_backend::probe::probe_path(&a.file)?;
    let report = match format {
        Format::Raw => Report {
            filename: a.file.clone(),
            format: "raw".into(),
            result: "clean",
            corruptions: vec![],
            leaks: vec![],
            leaked_bytes: 0,
            unused: vec![],
            unused_bytes: 0,
            found_before_repair: vec![],
            repairs: vec![],
            exit_code: 0,
        },
        Format::Vhd | Format::Vhdx => check_image(a, format)?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report, format));
    }
    Ok(report.exit_code)
}

fn check_image(a: &Args, format: Format) -> Result<Report> {
    let path = &a.file;
    if a.repair && a.share.force_share {
        anyhow::bail!("--force-share only reads: it cannot be combined with --repair");
    }
    let opts = a.share.open_options(path);
    let mut found_before_repair = Vec::new();
    let vreport = if a.repair {
        let before = format_check(format, path, false, opts.mode())?;
        found_before_repair.extend(before.corruptions);
        found_before_repair.extend(before.leaks);
        format_check(format, path, true, opts.mode())?
    } else {
        format_check(format, path, false, opts.mode())?
    };
    let mut corruptions = vreport.corruptions;
    let leaks = vreport.leaks;
    if let Some(f) = parent_link_finding(path, opts)? {
        corruptions.push(f);
    }
    let (result, exit_code) = if !corruptions.is_empty() {
        ("corrupt", 2)
    } else if !leaks.is_empty() {
        ("leaks", 3)
    } else {
        ("clean", 0)
    };
    Ok(Report {
        filename: path.clone(),
        format: format.to_string(),
        result,
        corruptions,
        leaks,
        leaked_bytes: vreport.leaked_bytes,
        unused_bytes: vreport.unused.iter().map(|u| u.length).sum(),
        unused: vreport.unused,
        found_before_repair,
        repairs: vreport.repairs,
        exit_code,
    })
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
