//! `vhdtool completions <shell>` and `vhdtool man [--dir DIR]`: shell completions and man
//! pages, generated from the clap definitions (so they never drift from the real options).
//!
//! ```text
//!   vhdtool completions bash > /etc/bash_completion.d/vhdtool
//!   vhdtool man | man -l -                    # vhdtool(1) on stdout
//!   vhdtool man --dir /usr/local/share/man/man1  # vhdtool.1 and vhdtool-VERB.1
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Arguments of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write vhdtool.1 and one vhdtool-VERB.1 per verb into DIR instead of printing
    /// vhdtool(1) to stdout.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs `completions`.
pub fn run(a: &Args) -> Result<u8> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "vhdtool", &mut std::io::stdout());
    Ok(0)
}

/// Runs `man`.
pub fn run_man(a: &ManArgs) -> Result<u8> {
    let cmd = crate::Cli::command();
    match &a.dir {
        None => {
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let write = |name: String, c: clap::Command| -> Result<()> {
                let path = dir.join(format!("{name}.1"));
                let mut out = Vec::new();
                clap_mangen::Man::new(c).render(&mut out)?;
                std::fs::write(&path, out)
                    .with_context(|| format!("cannot write {}", path.display()))
            };
            for sub in cmd.get_subcommands() {
                // clap names are 'static; one short string per verb, once per process.
                let name: &'static str =
                    Box::leak(format!("vhdtool-{}", sub.get_name()).into_boxed_str());
                write(name.to_string(), sub.clone().name(name))?;
            }
            write("vhdtool".into(), cmd)?;
        }
    }
    Ok(0)
}
