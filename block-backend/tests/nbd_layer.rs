//! The NBD layer under both engines: nbdkit serves a raw file (its `file` plugin), a chain is
//! opened on the `nbd+unix://` URI, and a batch of reads and writes (aligned and not), flush,
//! discard and write-zeroes goes through each engine. Reads must match a model, and the file
//! nbdkit serves, read directly afterwards, must hold exactly the model's bytes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use block_backend::engine::{new_engine, EngineKind, IoCompletion, IoRequest};
use block_backend::{open, AlignedBuf, OpenOptions};

const SIZE: u64 = 4 << 20;

/// nbdkit serving `file` on `socket`; killed on drop.
struct Nbdkit(Child);

impl Nbdkit {
    fn start(file: &Path, socket: &Path) -> Nbdkit {
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(socket)
            .arg("file")
            .arg(format!("file={}", file.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let mut k = Nbdkit(child);
        let t = Instant::now();
        while !socket.exists() {
            assert!(k.0.try_wait().unwrap().is_none(), "nbdkit exited");
            assert!(t.elapsed() < Duration::from_secs(20), "nbdkit not up");
            std::thread::sleep(Duration::from_millis(20));
        }
        k
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs `reqs` to completion and returns the completions in tag order.
fn run(engine: &mut dyn block_backend::engine::Engine, reqs: Vec<IoRequest>) -> Vec<IoCompletion> {
    let n = reqs.len();
    for r in reqs {
        engine.submit(r).unwrap();
    }
    engine.kick().unwrap();
    let mut done = Vec::new();
    while engine.in_flight() > 0 {
        engine.reap(1, &mut done).unwrap();
    }
    assert_eq!(done.len(), n);
    done.sort_by_key(|c| c.tag);
    done
}

#[test]
fn both_engines_read_and_write_an_nbd_export_exactly_like_a_model() {
    if !vhdkit_tests::tool_or_skip("nbdkit") {
        return;
    }
    for kind in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        let mut model = pattern(7, SIZE as usize);
        std::fs::write(&file, &model).unwrap();
        let socket = dir.path().join("k.sock");
        let _server = Nbdkit::start(&file, &socket);
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let chain = open(Path::new(&uri), OpenOptions::read_write()).unwrap();
        assert!(chain.top().file().is_none(), "an export has no local file");
        let mut engine = new_engine(kind, chain, 16).unwrap();

        let writes = [
            (0u64, 4096usize),
            (10_000, 777),
            (1 << 20, 300_000),
            (SIZE - 513, 513),
        ];
        let reqs = writes
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| {
                let data = pattern(i as u8 + 1, len);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                let mut b = AlignedBuf::new(len);
                b.copy_from_slice(&data);
                IoRequest::write(i as u64, off, b)
            })
            .collect();
        for c in run(engine.as_mut(), reqs) {
            c.result.unwrap();
        }
        for (tag, req) in [
            IoRequest::discard(0, 2 << 20, 1 << 20),
            IoRequest::write_zeroes(1, 5000, 70_000),
            IoRequest::flush(2),
        ]
        .into_iter()
        .enumerate()
        {
            let (off, len) = (req.offset() as usize, req.len() as usize);
            run(engine.as_mut(), vec![req]).remove(0).result.unwrap();
            if tag < 2 {
                model[off..off + len].fill(0);
            }
        }
        let reads = [
            (0u64, 9000usize),
            (9999, 100_000),
            (1 << 20, 2 << 20),
            (SIZE - 4096, 4096),
        ];
        let reqs = reads
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| IoRequest::read(i as u64, off, AlignedBuf::new(len)))
            .collect();
        for (c, &(off, len)) in run(engine.as_mut(), reqs).into_iter().zip(&reads) {
            c.result.unwrap();
            let b = c.buf.into_aligned().unwrap();
            assert!(
                b[..] == model[off as usize..off as usize + len],
                "{kind:?}: read {off}+{len} differs from the model"
            );
        }
        drop(engine);
        assert!(
            std::fs::read(&file).unwrap() == model,
            "{kind:?}: the served file differs from the model"
        );
    }
}
