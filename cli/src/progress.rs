//! Progress reporting on stderr for long copies.
//!
//! Shown when `-p` is given or stderr is a terminal: an indicatif bar on a terminal, plain
//! `    (42.00/100%)` lines (qemu-img style) when `-p` asks for progress on a pipe or file.
//! Never writes to stdout, so it cannot corrupt data piped out of the tool.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count progress reporter.
pub enum Progress {
    /// Nothing is shown.
    Hidden,
    /// An indicatif bar on a terminal.
    Bar(ProgressBar),
    /// Percentage lines, printed each time a whole percent is crossed.
    Plain {
        /// Total bytes.
        total: u64,
        /// Bytes done so far.
        done: u64,
        /// Last percentage printed.
        shown: u64,
    },
}

impl Progress {
    /// A reporter for `total` bytes; `requested` is the `-p` flag.
    pub fn new(total: u64, requested: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        if tty {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else if requested {
            let mut p = Progress::Plain {
                total,
                done: 0,
                shown: 0,
            };
            p.print_plain(0);
            p
        } else {
            Progress::Hidden
        }
    }

    /// Records `n` more bytes done.
    pub fn inc(&mut self, n: u64) {
        match self {
            Progress::Hidden => {}
            Progress::Bar(b) => b.inc(n),
            Progress::Plain {
                total, done, shown, ..
            } => {
                *done = done.saturating_add(n);
                let pct = if *total == 0 {
                    100
                } else {
                    (u128::from(*done) * 100 / u128::from(*total)).min(100) as u64
                };
                if pct > *shown {
                    *shown = pct;
                    self.print_plain(pct);
                }
            }
        }
    }

    /// Completes the display.
    pub fn finish(&mut self) {
        match self {
            Progress::Hidden => {}
            Progress::Bar(b) => b.finish_and_clear(),
            Progress::Plain { shown, .. } => {
                if *shown < 100 {
                    *shown = 100;
                    self.print_plain(100);
                }
            }
        }
    }

    fn print_plain(&mut self, pct: u64) {
        let mut err = std::io::stderr().lock();
        // Progress output is best effort: a closed stderr must not fail the copy.
        let _ = writeln!(err, "    ({pct}.00/100%)");
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
