//! The console: vm-superio's 16550A at 0x3f8 (IRQ 4 through an irqfd) writing to the VMM's
//! stdout, with a line scanner that notices the kernel's "Restarting system", "Power down" and
//! "Kernel panic" messages (how a reset or a triple fault is told apart from a crash).

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;

/// What the console has seen.
#[derive(Debug, Default, Clone)]
pub struct ConsoleState {
    /// The kernel printed `reboot: Restarting system`.
    pub restarting: bool,
    /// The kernel printed `reboot: Power down`.
    pub powering_down: bool,
    /// The kernel's panic line, if it panicked.
    pub panic: Option<String>,
    /// Bytes written so far.
    pub bytes: u64,
}

/// Output of the serial port: forwards to `out`, scanning lines into a [`ConsoleState`].
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    state: Arc<Mutex<ConsoleState>>,
}

/// Longest line kept for scanning (longer ones are scanned by their start).
const LINE_MAX: usize = 512;

impl ConsoleOut {
    /// Console output to `out`; `state` collects what was seen.
    pub fn new(out: Box<dyn Write + Send>, state: Arc<Mutex<ConsoleState>>) -> ConsoleOut {
        ConsoleOut {
            out,
            line: Vec::new(),
            state,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.bytes += buf.len() as u64;
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if line.contains("reboot: Restarting system") {
                    st.restarting = true;
                } else if line.contains("reboot: Power down") {
                    st.powering_down = true;
                } else if line.contains("Kernel panic - not syncing") && st.panic.is_none() {
                    st.panic = Some(line.trim().to_string());
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        // The guest must not stall on a closed stdout: bytes that cannot be written are lost.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART model.
pub type SerialDevice = Serial<EventFdTrigger, NoEvents, ConsoleOut>;

/// The UART's registers and receive FIFO, for a checkpoint.
pub fn save_state(s: &SerialDevice) -> crate::state::SerialState {
    let st = s.state();
    crate::state::SerialState {
        registers: [
            st.baud_divisor_low,
            st.baud_divisor_high,
            st.interrupt_enable,
            st.interrupt_identification,
            st.line_control,
            st.line_status,
            st.modem_control,
            st.modem_status,
            st.scratch,
        ],
        in_buffer: st.in_buffer,
    }
}

/// A UART with saved registers (a FIFO longer than the UART's is refused).
pub fn restore(
    saved: &crate::state::SerialState,
    trigger: EventFdTrigger,
    out: ConsoleOut,
) -> Result<SerialDevice, String> {
    let r = saved.registers;
    let st = vm_superio::serial::SerialState {
        baud_divisor_low: r[0],
        baud_divisor_high: r[1],
        interrupt_enable: r[2],
        interrupt_identification: r[3],
        line_control: r[4],
        line_status: r[5],
        modem_control: r[6],
        modem_status: r[7],
        scratch: r[8],
        in_buffer: saved.in_buffer.clone(),
    };
    Serial::from_state(&st, trigger, NoEvents, out).map_err(|e| format!("serial state: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (SerialDevice, Shared, Arc<Mutex<ConsoleState>>, EventFd) {
        let out = Shared::default();
        let state = Arc::new(Mutex::new(ConsoleState::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let s = Serial::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            ConsoleOut::new(Box::new(out.clone()), state.clone()),
        );
        (s, out, state, irq)
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output_and_raise_thre() {
        let (mut s, out, _, irq) = serial();
        s.write(1, 0x02).unwrap(); // IER: THR empty interrupt
        let _ = irq.read();
        assert_eq!(s.read(2) & 0x0f, 0x02, "IIR: THR empty (read acknowledges)");
        for b in b"hi\n" {
            s.write(0, *b).unwrap();
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1, "THRE interrupt raised");
        // LSR: THR empty and transmitter idle.
        assert_eq!(s.read(5) & 0x60, 0x60);
    }

    #[test]
    fn input_bytes_are_readable_and_raise_an_interrupt() {
        let (mut s, _, _, irq) = serial();
        s.write(1, 0x01).unwrap(); // IER: received data available
        let _ = irq.read();
        s.enqueue_raw_bytes(b"ok").unwrap();
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(s.read(5) & 1, 1, "LSR data ready");
        assert_eq!(s.read(0), b'o');
        assert_eq!(s.read(0), b'k');
        assert_eq!(s.read(5) & 1, 0);
    }

    #[test]
    fn scanner_notices_restart_power_down_and_panic_lines() {
        let (mut s, _, state, _) = serial();
        let mut say = |text: &str| {
            for b in text.bytes() {
                s.write(0, b).unwrap();
            }
        };
        say("[    1.0] reboot: Restarting sys");
        assert!(!state.lock().unwrap().restarting, "only whole lines count");
        say("tem\n");
        assert!(state.lock().unwrap().restarting);
        say("[ 2.0] Kernel panic - not syncing: Attempted to kill init!\n");
        say("[ 2.1] Kernel panic - not syncing: second\n");
        let st = state.lock().unwrap().clone();
        assert_eq!(
            st.panic.as_deref(),
            Some("[ 2.0] Kernel panic - not syncing: Attempted to kill init!")
        );
        assert!(!st.powering_down);
        drop(st);
        say("reboot: Power down\n");
        assert!(state.lock().unwrap().powering_down);
    }
}
