//! A volume over a real file: what only a file backend does must reach it through the engine.

use blockguard::blockguard_backend::{Backend, FileBackend, FileOptions};
use blockguard::{FormatOptions, OpenOptions, Volume};
use std::sync::Arc;

/// The engine hints the kernel to start writing a large data run back as soon as it is written,
/// so the flush that must precede the metadata finds less to do. Nothing but speed shows it, so
/// a wrapper or a refactor that silently dropped the hint would go unnoticed without this.
#[test]
fn a_volume_over_a_file_issues_the_writeback_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.bgv");
    let opts = FormatOptions::with_size(64 << 20);
    let file =
        Arc::new(FileBackend::create(&path, opts.backing_len().unwrap(), &FileOptions::default()).unwrap());
    drop(Volume::format(file.clone(), &opts).unwrap());
    let vol = Volume::open(
        file.clone(),
        &OpenOptions {
            background_commit: false,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let before = file.writeback_hints();
    // One contiguous run of 4 MiB: long enough for the engine to hint at.
    vol.write_at(&vec![0x5a; 4 << 20], 8 << 20).unwrap();
    vol.flush().unwrap();
    assert!(
        file.writeback_hints() > before,
        "no writeback hint reached {} for a 4 MiB run",
        file.name()
    );
    // Small scattered writes are left to the flush: hinting each would cost a syscall per block.
    let after_run = file.writeback_hints();
    for i in 0..16u64 {
        vol.write_at(&[1u8; 4096], i << 20).unwrap();
    }
    vol.flush().unwrap();
    assert_eq!(file.writeback_hints(), after_run, "a hint per 4 KiB block");
    vol.close().unwrap();
}
