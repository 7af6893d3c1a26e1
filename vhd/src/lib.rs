//! TEMPORARY API STUB — being replaced by the real implementation (see API.md).
#![allow(unused_variables, dead_code, clippy::all)]
mod error;
pub use error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType { Fixed, Dynamic, Differencing }
impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self { DiskType::Fixed => "fixed", DiskType::Dynamic => "dynamic", DiskType::Differencing => "differencing" })
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode { ReadOnly, ReadWrite }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability { Durable, Relaxed }
#[derive(Debug, Clone)]
pub struct Footer { pub creator_app: [u8; 4], pub uuid: uuid::Uuid }
#[derive(Debug)]
pub struct VhdImage { path: PathBuf, file: std::fs::File, footer: Footer, parent: Option<ParentLink> }
impl VhdImage {
    pub fn probe(file: &std::fs::File) -> std::io::Result<bool> { unimplemented!() }
    pub fn open(path: &Path, mode: OpenMode) -> Result<VhdImage> { unimplemented!() }
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VhdImage> { unimplemented!() }
    pub fn path(&self) -> &Path { &self.path }
    pub fn file(&self) -> &std::fs::File { &self.file }
    pub fn virtual_size(&self) -> u64 { unimplemented!() }
    pub fn disk_type(&self) -> DiskType { unimplemented!() }
    pub fn footer(&self) -> &Footer { &self.footer }
    pub fn creator(&self) -> String { unimplemented!() }
    pub fn uuid(&self) -> uuid::Uuid { unimplemented!() }
    pub fn block_size(&self) -> Option<u32> { unimplemented!() }
    pub fn is_writable(&self) -> bool { unimplemented!() }
    pub fn parent(&self) -> Option<&ParentLink> { self.parent.as_ref() }
    pub fn set_durability(&mut self, d: Durability) {}
    pub fn resolve_read(&mut self, offset: u64, len: u64) -> Result<Vec<ReadExtent>> { unimplemented!() }
    pub fn resolve_write(&mut self, offset: u64, len: u64) -> Result<WritePlan> { unimplemented!() }
    pub fn commit_write(&mut self, plan: WritePlan) -> Result<()> { unimplemented!() }
    pub fn flush(&mut self) -> Result<()> { unimplemented!() }
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> { unimplemented!() }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadExtent { pub offset: u64, pub len: u64, pub source: ReadSource }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource { Data { file_offset: u64 }, Zero, Parent }
#[derive(Debug)]
pub struct WritePlan { pub extents: Vec<WriteExtent> }
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteExtent { pub offset: u64, pub len: u64, pub file_offset: u64 }
#[derive(Debug, Clone)]
pub struct ParentLink { pub uuid: uuid::Uuid, pub timestamp: u32, pub unicode_name: String, pub candidates: Vec<PathBuf> }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdType { Fixed, Dynamic }
#[derive(Debug, Clone)]
pub struct CreateOptions { pub size: u64, pub vhd_type: VhdType, pub block_size: u32, pub sparse: bool, pub parent: Option<PathBuf> }
impl Default for CreateOptions {
    fn default() -> Self { CreateOptions { size: 0, vhd_type: VhdType::Dynamic, block_size: 2 << 20, sparse: false, parent: None } }
}
pub fn check(path: &Path) -> Result<CheckReport> { unimplemented!() }
pub fn repair(path: &Path) -> Result<CheckReport> { unimplemented!() }
#[derive(Debug, Clone, Default)]
pub struct CheckReport { pub corruptions: Vec<Finding>, pub leaks: Vec<Finding>, pub repairs: Vec<String>, pub leaked_bytes: u64 }
#[derive(Debug, Clone)]
pub struct Finding { pub structure: String, pub offset: u64, pub message: String }
impl CheckReport { pub fn exit_code(&self) -> i32 { if !self.corruptions.is_empty() { 2 } else if !self.leaks.is_empty() { 3 } else { 0 } } }
