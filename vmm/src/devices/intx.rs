//! Legacy PCI interrupts (INTx), for virtio-pci drivers that do not use MSI-X: Linux booted
//! with `pci=nomsi`, or a driver without MSI-X support. Every function's INTA# is one shared,
//! level-triggered IOAPIC pin ([`crate::layout::PCI_INTX_GSI`], named for every slot by the
//! DSDT's `PCI0._PRT`).
//!
//! ```text
//!  function:  interrupt while MSI-X is off ──> Intx::raise ─┐   (unless INTx disabled,
//!             ISR read (clears), reset, leaving ─> lower ───┤    command register bit 10)
//!  SharedLine: level = OR of the functions' levels ─────────┴─> KVM_IRQ_LINE(GSI, level)
//! ```
//!
//! Invariants: the line's level is the OR of its functions' levels and changes under one lock,
//! so one function lowering never drops the line while another still asserts; a function that
//! leaves (its [`Intx`] dropped) lowers its level; a function with INTx disabled never raises.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

/// Drives one interrupt line (KVM_IRQ_LINE in the VMM, a recorder in tests).
pub trait LineSetter: Send + Sync {
    /// Sets the line to `level`.
    fn set_line(&self, level: bool) -> Result<(), String>;
}

/// A GSI of the in-kernel IOAPIC, driven with KVM_IRQ_LINE.
pub struct KvmLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmLine {
    /// Line `gsi` of `vm`.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> KvmLine {
        KvmLine { vm, gsi }
    }
}

impl LineSetter for KvmLine {
    fn set_line(&self, level: bool) -> Result<(), String> {
        self.vm
            .set_irq_line(self.gsi, level)
            .map_err(|e| format!("KVM_IRQ_LINE (GSI {}, level {level}): {e}", self.gsi))
    }
}

/// One level-triggered line shared by every function's INTx.
pub struct SharedLine {
    setter: Box<dyn LineSetter>,
    /// The functions asserting it now.
    asserted: Mutex<BTreeSet<u64>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for SharedLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLine")
            .field("high", &self.is_high())
            .finish()
    }
}

impl SharedLine {
    /// A line, low, driven through `setter`.
    pub fn new(setter: Box<dyn LineSetter>) -> Arc<SharedLine> {
        Arc::new(SharedLine {
            setter,
            asserted: Mutex::new(BTreeSet::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// A new function's INTx on this line, not asserting, enabled.
    pub fn function(self: &Arc<SharedLine>) -> Intx {
        Intx {
            line: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            disabled: AtomicBool::new(false),
        }
    }

    /// Whether any function asserts the line.
    pub fn is_high(&self) -> bool {
        !self
            .asserted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Sets function `id`'s level; a raise is dropped if `disabled` is set by then (read under
    /// the lock, so a raise racing [`Intx::set_disabled`] cannot leave the line high).
    fn set(&self, id: u64, level: bool, disabled: &AtomicBool) {
        let mut asserted = self.asserted.lock().unwrap_or_else(|e| e.into_inner());
        let was_high = !asserted.is_empty();
        if level && !disabled.load(Ordering::SeqCst) {
            asserted.insert(id);
        } else {
            asserted.remove(&id);
        }
        let high = !asserted.is_empty();
        if high != was_high {
            if let Err(e) = self.setter.set_line(high) {
                tracing::warn!("PCI INTx: {e}");
            }
        }
    }
}

/// One function's INTA#.
#[derive(Debug)]
pub struct Intx {
    line: Arc<SharedLine>,
    id: u64,
    /// Command register bit 10 (Interrupt Disable).
    disabled: AtomicBool,
}

impl Intx {
    /// Asserts the function's INTx, unless the driver disabled it.
    pub fn raise(&self) {
        self.line.set(self.id, true, &self.disabled);
    }

    /// Deasserts the function's INTx.
    pub fn lower(&self) {
        self.line.set(self.id, false, &self.disabled);
    }

    /// The driver's Interrupt Disable bit; disabling lowers the function's level.
    pub fn set_disabled(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::SeqCst);
        if disabled {
            self.lower();
        }
    }
}

impl Drop for Intx {
    fn drop(&mut self) {
        self.lower();
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Records every level set on the line.
    #[derive(Default)]
    pub struct Levels(pub Mutex<Vec<bool>>);

    impl LineSetter for Arc<Levels> {
        fn set_line(&self, level: bool) -> Result<(), String> {
            self.0.lock().unwrap().push(level);
            Ok(())
        }
    }

    /// A line that records its levels.
    pub fn recorded_line() -> (Arc<SharedLine>, Arc<Levels>) {
        let levels = Arc::new(Levels::default());
        (SharedLine::new(Box::new(levels.clone())), levels)
    }

    #[test]
    fn the_line_stays_high_while_any_function_asserts_it() {
        let (line, levels) = recorded_line();
        let (a, b) = (line.function(), line.function());
        a.raise();
        b.raise();
        a.raise();
        assert!(line.is_high());
        a.lower();
        assert!(line.is_high(), "b still asserts");
        b.lower();
        assert!(!line.is_high());
        assert_eq!(
            *levels.0.lock().unwrap(),
            vec![true, false],
            "one edge each way"
        );
    }

    #[test]
    fn a_disabled_function_never_raises_and_a_leaving_one_lowers() {
        let (line, _) = recorded_line();
        let a = line.function();
        a.raise();
        a.set_disabled(true);
        assert!(!line.is_high(), "disabling lowers");
        a.raise();
        assert!(!line.is_high(), "disabled: no raise");
        a.set_disabled(false);
        a.raise();
        assert!(line.is_high());
        drop(a);
        assert!(!line.is_high(), "a function leaving lowers its level");
    }
}
