//! The console's input side: stdin into the UART's receive FIFO, with the terminal in raw
//! mode while the VM runs (restored on drop); on a terminal, ^A x stops the VM.

use std::io::Read;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::terminal::Terminal;

use crate::devices::serial::SerialDevice;
use crate::vcpu::VmEvent;
use crate::vm::block_stop_signals;
use crate::Error;

/// Console escape: ^A then `x` stops the VM (when stdin is a terminal).
const ESCAPE: u8 = 0x01;

/// Restores the terminal mode on drop, when stdin is a terminal put in raw mode.
pub(crate) struct TerminalGuard;

impl TerminalGuard {
    pub(crate) fn new() -> Option<TerminalGuard> {
        let stdin = std::io::stdin();
        let lock = stdin.lock();
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return None;
        }
        lock.set_raw_mode().ok()?;
        Some(TerminalGuard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Feeds stdin to the UART. With a terminal, ^A x stops the VM.
pub(crate) fn spawn_stdin(serial: Arc<Mutex<SerialDevice>>, tx: Sender<VmEvent>, tty: bool) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            block_stop_signals();
            let mut buf = [0u8; 64];
            let mut escape = false;
            let stdin = std::io::stdin();
            loop {
                let n = match stdin.lock().read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut input = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if tty && escape {
                        escape = false;
                        if b == b'x' {
                            let _ = tx
                                .send(Err(Error::Setup("stopped from the console (^A x)".into())));
                            return;
                        }
                        input.push(ESCAPE);
                        if b == ESCAPE {
                            continue;
                        }
                    } else if tty && b == ESCAPE {
                        escape = true;
                        continue;
                    }
                    input.push(b);
                }
                let mut rest = &input[..];
                while !rest.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_raw_bytes(rest)
                        .unwrap_or(0);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        // The guest has not read the FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
}
