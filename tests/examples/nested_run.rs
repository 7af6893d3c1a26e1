//! Runs a shell script where the end-to-end VMM tests run theirs, for benchmarks
//! (benches/vm-state.sh): directly when this host's KVM boots a stock kernel, else in the
//! nested harness's L1 (tests/tests/nested/mod.rs: Linux under QEMU TCG with nested KVM).
//!
//! ```text
//! nested_run --kernel                     prints the cached Debian kernel: "VMLINUZ\tMODULES"
//! nested_run [--program PATH]... [--file PATH]... [--scratch SIZE] DIR SCRIPT
//! ```
//!
//! SCRIPT runs with `W` = the folder of its files (DIR directly, `/work` in L1), `V` = the
//! vhdtool command and `P_<name>` = the command of each `--program` (named by its file name,
//! `-` and `.` read as `_`). Nested, each `--file` (a file or a folder) is copied into the
//! scratch disk beside the programs, which come with the libraries they link; directly, DIR
//! must already hold them. The script's output (L1's console, nested) goes to stdout; the exit
//! status is 0 once the script has run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../tests/nested/mod.rs"]
mod nested;

fn var_name(program: &Path) -> String {
    let name = program.file_name().unwrap().to_string_lossy();
    format!("P_{}", name.replace(['-', '.'], "_"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut programs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut scratch = "4G".to_string();
    let mut rest = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--kernel" => {
                let k = nested::kernel();
                println!("{}\t{}", k.vmlinuz.display(), k.modules.display());
                return;
            }
            "--program" => programs.push(args.next().expect("--program PATH").into()),
            "--file" => files.push(args.next().expect("--file PATH").into()),
            "--scratch" => scratch = args.next().expect("--scratch SIZE"),
            _ => rest.push(a),
        }
    }
    let [dir, script] = <[String; 2]>::try_from(rest).unwrap_or_else(|_| {
        eprintln!("usage: nested_run [--program PATH]... [--file PATH]... DIR SCRIPT");
        std::process::exit(2)
    });
    let dir = PathBuf::from(dir);
    let script = fs::read_to_string(&script).unwrap_or_else(|e| panic!("{script}: {e}"));
    match nested::mode() {
        nested::Mode::Direct => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(&script)
                .env("W", &dir)
                .env("V", vhdkit_tests::vhdtool_bin());
            for p in &programs {
                sh.env(var_name(p), p);
            }
            let (_, out) = nested::run_guarded(sh, "the script");
            print!("{out}");
        }
        nested::Mode::Nested => {
            let stage = dir.join("stage");
            let _ = fs::remove_dir_all(&stage);
            fs::create_dir_all(&stage).unwrap();
            nested::stage_vhdtool(&stage);
            let mut head = format!("W=/work\nV='{}'\n", nested::L1_VHDTOOL);
            for p in &programs {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                nested::stage_program(&stage, p, &name);
                head.push_str(&format!(
                    "{}='{}'\n",
                    var_name(p),
                    nested::l1_command(&name)
                ));
            }
            for f in &files {
                let to = stage.join(f.file_name().unwrap());
                vhdkit_tests::run(Command::new("cp").arg("-a").arg(f).arg(&to));
            }
            nested::write_exec(&stage.join("run.sh"), &format!("{head}{script}"));
            let kernel = nested::kernel();
            let (out, _) = nested::run_l1(&dir, &stage, &kernel, &scratch);
            print!("{out}");
        }
    }
}
