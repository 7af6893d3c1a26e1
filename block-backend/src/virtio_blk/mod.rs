//! The virtio-blk device model (virtio 1.x, split queues), independent of any VMM: a transport
//! hands it configured queues and guest memory, calls [`VirtioBlk::process_queue`] when the
//! driver notifies and [`VirtioBlk::process_completions`] when the engine has completions, and
//! wires the notify callback to an interrupt.

mod device;
pub mod request;

pub use device::{Config, VirtioBlk, MAX_DISCARD_SECTORS, SEG_MAX, SIZE_MAX};
