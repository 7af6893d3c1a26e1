//! Disks: a template per kind, built once per process, copied to a scratch file per input.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiskKind {
    Raw,
    /// A raw file whose length is not a whole number of sectors.
    RawTail,
    /// 64 KiB: most requests reach past the end.
    RawTiny,
    Vhd4k,
    Vhd64k,
    Vhdx512,
    Vhdx4k,
}

impl DiskKind {
    pub(super) fn from_bits(b: u8) -> DiskKind {
        [
            DiskKind::Raw,
            DiskKind::RawTail,
            DiskKind::Vhd4k,
            DiskKind::Vhd64k,
            DiskKind::Vhdx512,
            DiskKind::Vhdx4k,
            DiskKind::RawTiny,
            DiskKind::Raw,
        ][b as usize & 7]
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn ext(self) -> &'static str {
        match self {
            DiskKind::Raw | DiskKind::RawTail | DiskKind::RawTiny => "img",
            DiskKind::Vhd4k | DiskKind::Vhd64k => "vhd",
            DiskKind::Vhdx512 | DiskKind::Vhdx4k => "vhdx",
        }
    }
}

/// A disk as first written for every input.
pub(super) struct Template {
    pub(super) file: Vec<u8>,
    /// Non-zero 4 KiB runs of `file` (the rest is written as a hole).
    pub(super) runs: Vec<(usize, usize)>,
    /// The virtual disk's bytes.
    pub(super) content: Vec<u8>,
}

/// This process's scratch directory (in `/dev/shm` when there is one).
pub(super) fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| crate::make_scratch_dir("virtio"))
}

pub(super) static SCRATCH_USED: AtomicBool = AtomicBool::new(false);

/// Held (shared) by every input while it uses the scratch directory, and (exclusive) by
/// [`cleanup`]: `cargo test` replays corpus and regressions on two threads, and the first to
/// finish cleans up while the other may still be running.
pub(super) static SCRATCH_LOCK: RwLock<()> = RwLock::new(());

pub(crate) fn cleanup() {
    let _excl = SCRATCH_LOCK.write().unwrap_or_else(PoisonError::into_inner);
    if SCRATCH_USED.load(Ordering::SeqCst) {
        let _ = std::fs::remove_dir_all(scratch_dir());
    }
}

/// A file name per thread: `cargo test` replays corpus and regressions on two threads at once.
pub(super) fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::SeqCst);
    }
    SLOT.with(|s| *s)
}

pub(super) fn template(kind: DiskKind) -> &'static Template {
    static TEMPLATES: [OnceLock<Template>; 7] = [const { OnceLock::new() }; 7];
    TEMPLATES[kind.index()].get_or_init(|| build_template(kind))
}

pub(super) fn build_template(kind: DiskKind) -> Template {
    SCRATCH_USED.store(true, Ordering::SeqCst);
    let path = scratch_dir().join(format!("template-{}.{}", kind.index(), kind.ext()));
    let _ = std::fs::remove_file(&path);
    let fill = |path: &Path, spans: &[(u64, usize)]| {
        let mut d = block_backend::open(path, OpenOptions::read_write()).expect("open a template");
        for (i, &(at, len)) in spans.iter().enumerate() {
            d.write_at(&pattern(0x7E57 + i as u64, len), at)
                .expect("fill a template");
        }
        d.flush().expect("flush a template");
    };
    match kind {
        DiskKind::Raw | DiskKind::RawTail | DiskKind::RawTiny => {
            let len = match kind {
                DiskKind::Raw => 256 << 10,
                DiskKind::RawTail => (192 << 10) + 100,
                _ => 64 << 10,
            };
            std::fs::write(&path, pattern(0xD15C + len as u64, len)).expect("write a template");
        }
        DiskKind::Vhd4k | DiskKind::Vhd64k => {
            let (block, size) = if kind == DiskKind::Vhd4k {
                (4096, 320 << 10)
            } else {
                (64 << 10, 640 << 10)
            };
            drop(
                vhd::VhdImage::create(
                    &path,
                    &vhd::CreateOptions {
                        size,
                        block_size: block,
                        ..Default::default()
                    },
                )
                .expect("create a VHD template"),
            );
            // Some blocks allocated (whole and partial), the rest not.
            fill(
                &path,
                &[(0, 6144), (3 * 4096 + 512, 4096), (96 << 10, 64 << 10)],
            );
        }
        DiskKind::Vhdx512 | DiskKind::Vhdx4k => {
            let lss = if kind == DiskKind::Vhdx512 { 512 } else { 4096 };
            vhdx::VhdxImage::create(
                &path,
                &vhdx::CreateOptions {
                    size: (3 << 20) / 2,
                    block_size: Some(1 << 20),
                    logical_sector_size: lss,
                    ..Default::default()
                },
            )
            .expect("create a VHDX template")
            .close()
            .expect("close a VHDX template");
            fill(&path, &[(0, 64 << 10), ((1 << 20) - 4096, 12288)]);
        }
    }
    let file = std::fs::read(&path).expect("read a template");
    let mut d = block_backend::open(&path, OpenOptions::read_only()).expect("open a template");
    let mut content = vec![0u8; d.size() as usize];
    d.read_at(&mut content, 0).expect("read a template");
    drop(d);
    let _ = std::fs::remove_file(&path);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, chunk) in file.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            let (s, e) = (i * 4096, i * 4096 + chunk.len());
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
    }
    Template {
        file,
        runs,
        content,
    }
}

pub(super) fn write_disk(path: &Path, t: &Template) {
    let f = File::create(path).expect("create the scratch disk");
    f.set_len(t.file.len() as u64)
        .expect("size the scratch disk");
    for &(s, e) in &t.runs {
        f.write_all_at(&t.file[s..e], s as u64)
            .expect("write the scratch disk");
    }
}
