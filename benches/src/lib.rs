//! Benchmarks of vhdkit. Micro-benchmarks (criterion) of the hot paths are in
//! `benches/hot_paths.rs` (`cargo bench -p benches`); side-by-side comparisons with qemu-img,
//! fio and vhdimount are the scripts beside this crate (`backend.sh`, `fuse.sh`, `convert.sh`).
