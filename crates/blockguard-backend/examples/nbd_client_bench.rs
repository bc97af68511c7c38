//! Throughput of the NBD client backend: `THREADS` threads doing random aligned writes, then
//! reads, of `SIZE` bytes each against an export, for a few seconds each.
//!
//! `cargo run --release -p blockguard-backend --example nbd_client_bench -- URI THREADS CONNECTIONS SIZE`
//! (for example against `nbdkit -U /tmp/s memory 1G`: `nbd+unix:///?socket=/tmp/s 8 4 4096`).

use blockguard_backend::{Backend, NbdBackend, NbdOptions};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [uri, threads, conns, size] = args.as_slice() else {
        return Err("usage: nbd_client_bench URI THREADS CONNECTIONS SIZE".into());
    };
    let (threads, conns, size): (u64, usize, u64) = (threads.parse()?, conns.parse()?, size.parse()?);
    let opts = NbdOptions {
        connections: conns,
        ..NbdOptions::default()
    };
    let b = Arc::new(NbdBackend::connect(uri, &opts)?);
    let slots = b.len() / size;
    for write in [true, false] {
        let ops = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let run_for = Duration::from_secs(3);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (b, ops) = (Arc::clone(&b), Arc::clone(&ops));
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t);
                    let mut buf = vec![0x5au8; usize::try_from(size).unwrap_or(4096)];
                    while start.elapsed() < run_for {
                        let at = rng.random_range(0..slots) * size;
                        if write {
                            b.write_at(&buf, at)?;
                        } else {
                            b.read_at(&mut buf, at)?;
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a thread panicked")??;
        }
        let secs = start.elapsed().as_secs_f64();
        let n = ops.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // Display only.
        let (iops, mbs) = (n as f64 / secs, (n * size) as f64 / secs / 1e6);
        println!(
            "{} threads={threads} connections={} size={size}: {iops:.0} IOPS, {mbs:.0} MB/s",
            if write { "write" } else { "read " },
            b.connections()
        );
    }
    Ok(())
}
