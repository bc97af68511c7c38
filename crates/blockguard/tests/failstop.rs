//! Fail-stop: a panic inside the engine means one of its invariants may be broken. The volume
//! must then refuse writes and flushes (reads may go on) and report the failure at close,
//! instead of carrying on as if nothing happened.

use blockguard::blockguard_backend::MemoryBackend;
use blockguard::{Error, FormatOptions, OpenOptions, Volume};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A write buffer that panics when its bytes are looked at once `armed` — a stand-in for a bug
/// that panics while the engine holds its commit lock.
struct Treacherous {
    data: Vec<u8>,
    armed: Arc<AtomicBool>,
}

impl AsRef<[u8]> for Treacherous {
    fn as_ref(&self) -> &[u8] {
        if self.armed.load(Ordering::SeqCst) {
            panic!("injected panic while the engine reads a staged buffer");
        }
        &self.data
    }
}

#[test]
fn a_panic_while_committing_fails_the_volume_for_writes_but_not_for_reads() {
    let opts = FormatOptions::with_size(4 << 20);
    let backend = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
    drop(Volume::format(backend.clone(), &opts).unwrap());
    let vol = Volume::open(
        backend.clone(),
        &OpenOptions {
            background_commit: false,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    vol.write_at(&[7u8; 4096], 0).unwrap();
    vol.flush().unwrap();
    // Staged fine; the commit's data write looks at the bytes again, armed, and panics.
    let armed = Arc::new(AtomicBool::new(false));
    let bad = Treacherous {
        data: vec![9u8; 4096],
        armed: armed.clone(),
    };
    vol.write_owned(bad, 8192).unwrap();
    armed.store(true, Ordering::SeqCst);
    let panicked = catch_unwind(AssertUnwindSafe(|| vol.flush()));
    assert!(panicked.is_err(), "the injected panic reached the caller");
    // Failed: writes and flushes refuse, with the reason.
    match vol.write_at(&[1u8; 4096], 4096) {
        Err(Error::Failed { detail, .. }) => assert!(detail.contains("panicked"), "{detail}"),
        other => panic!("a write after a panic: {other:?}"),
    }
    assert!(matches!(vol.flush(), Err(Error::Failed { .. })));
    // Reads go on: what was flushed before is there.
    let mut buf = vec![0u8; 4096];
    vol.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    // Close reports the failure, and leaves the volume marked in use (not clean).
    assert!(vol.close().is_err());
    let again = Volume::open(
        backend,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(again.superblock().state, blockguard::format::VolumeState::InUse);
    let mut buf = vec![0u8; 4096];
    again.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
}
