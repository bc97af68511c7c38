//! Group commit: concurrent flushes share one commit and one backend flush.
//!
//! A flush may return `Ok` only once a commit-and-flush that *began after it was called* has
//! succeeded: only such a one is sure to cover every write that completed before the call.
//! While one runs, every caller arriving meanwhile waits for it to end and then for the single
//! next one, which covers them all. Without this, N clients that flush after every write (FUA
//! writes, `fsync` in a guest) pay N serialized backend flushes where one would do.

use super::Inner;
use crate::error::Result;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

/// Numbers flushes as they begin and end, so a caller can tell whether one covers it.
#[derive(Default)]
pub(crate) struct FlushSequence {
    state: Mutex<Sequence>,
    done: Condvar,
}

#[derive(Default)]
struct Sequence {
    /// Flushes begun so far; the next one to begin gets `began + 1`.
    began: u64,
    /// The number of the last flush that ended.
    ended: u64,
    /// A flush is running.
    running: bool,
    /// Callers waiting for a flush to cover them.
    waiting: usize,
    /// Flush number `ended` succeeded.
    last_ok: bool,
}

/// Ends the running flush when dropped, also when the flush panicked: waiters must not hang
/// on a flush that will never end (a panic has failed the volume; their own flush says so).
struct Ending<'a> {
    inner: &'a Inner,
    number: u64,
    ok: bool,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let seq = &self.inner.flushes;
        let mut st = self.inner.lock(&seq.state);
        debug_assert!(st.running && st.ended < self.number);
        st.running = false;
        st.ended = self.number;
        st.last_ok = self.ok;
        seq.done.notify_all();
    }
}

impl Inner {
    /// Makes every write that completed before this call durable, sharing the work with
    /// concurrent callers.
    pub(crate) fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.stats.flush_calls.fetch_add(1, Ordering::Relaxed);
        let seq = &self.flushes;
        let mut st = self.lock(&seq.state);
        let covering = st.began + 1;
        loop {
            if st.ended >= covering {
                if st.last_ok {
                    return Ok(());
                }
                // The flush that covered us failed. Its error went to its caller; errors are
                // not shared, so flush again to learn ours (the cause may also be gone).
                drop(st);
                return self.flush_now();
            }
            if !st.running {
                st.running = true;
                st.began += 1;
                let number = st.began;
                drop(st);
                let mut ending = Ending {
                    inner: self,
                    number,
                    ok: false,
                };
                let result = self.flush_now();
                ending.ok = result.is_ok();
                return result;
            }
            st.waiting += 1;
            st = self.wait(&seq.done, st);
            st.waiting -= 1;
        }
    }

    /// One commit of everything staged, then a backend flush.
    fn flush_now(&self) -> Result<()> {
        self.stats.flush_rounds.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock(&self.commit);
        self.failed()?;
        if !self.lock(&self.stage).active.is_empty() {
            // Under the `read-only` error policy's suspension nothing new is committed; a
            // flush with nothing staged still makes earlier commits durable.
            self.suspended()?;
        }
        self.commit_locked(&mut state)?;
        self.flush_locked(&mut state)?;
        // Everything committed is durable now: no group is unsettled any more.
        self.clear_session_if_due(self.dirty_clear_interval, false)?;
        // Acknowledged writes that could not be kept: this flush cannot promise them.
        self.lost_writes(&state)
    }
}

#[cfg(test)]
mod tests {
    use crate::{FormatOptions, OpenOptions, Volume};
    use blockguard_backend::{Backend, MemoryBackend};
    use std::io;
    use std::ops::Range;
    use std::sync::{Arc, Condvar, Mutex};

    /// Memory whose flushes can be held at a gate, to line callers up behind a running flush.
    #[derive(Debug)]
    struct Gated {
        mem: MemoryBackend,
        /// (gate closed, flushes currently held, flushes fail)
        gate: Mutex<(bool, usize, bool)>,
        cv: Condvar,
    }

    impl Gated {
        fn set(&self, closed: bool) {
            self.gate.lock().unwrap().0 = closed;
            self.cv.notify_all();
        }
        fn wait_held(&self, n: usize) {
            let mut g = self.gate.lock().unwrap();
            while g.1 < n {
                g = self.cv.wait(g).unwrap();
            }
        }
    }

    impl Backend for Gated {
        fn len(&self) -> u64 {
            self.mem.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            let mut g = self.gate.lock().unwrap();
            g.1 += 1;
            self.cv.notify_all();
            while g.0 {
                g = self.cv.wait(g).unwrap();
            }
            g.1 -= 1;
            if g.2 {
                return Err(io::Error::other("injected flush failure"));
            }
            drop(g);
            self.mem.flush()
        }
        fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
            self.mem.zero_range(offset, len)
        }
        fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
            self.mem.zero_ranges(offset, len)
        }
        fn name(&self) -> String {
            "gated".into()
        }
    }

    fn waiting(vol: &Volume) -> usize {
        vol.inner.lock(&vol.inner.flushes.state).waiting
    }

    /// Callers arriving while a flush runs share the one next round instead of running one
    /// each, and every one of them still gets a round that began after it arrived.
    #[test]
    fn flushes_arriving_during_a_flush_share_the_next_round() {
        let (gated, vol) = gated_volume(4 << 20);
        vol.write_at(&[1u8; 4096], 0).unwrap();
        gated.set(true);
        let first = {
            let vol = vol.clone();
            std::thread::spawn(move || vol.flush())
        };
        gated.wait_held(1);
        let before = vol.stats();
        // Three writers write, then flush while the first round is held at the gate.
        let late: Vec<_> = (1..4u8)
            .map(|i| {
                let vol = vol.clone();
                vol.write_at(&[i; 4096], u64::from(i) * 4096).unwrap();
                std::thread::spawn(move || vol.flush())
            })
            .collect();
        while waiting(&vol) < 3 {
            std::thread::yield_now();
        }
        gated.set(false);
        first.join().unwrap().unwrap();
        for t in late {
            t.join().unwrap().unwrap();
        }
        let after = vol.stats();
        assert_eq!(after.flush_calls - before.flush_calls, 3);
        assert_eq!(after.flush_rounds - before.flush_rounds, 1, "one shared round");
        // The shared round covered every late writer: all of it is durable.
        let vol = Arc::try_unwrap(vol).unwrap();
        vol.close().unwrap();
        let reopened = Volume::open(
            gated,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        for i in 0..4u8 {
            let mut b = [0u8; 4096];
            reopened.read_at(&mut b, u64::from(i) * 4096).unwrap();
            assert_eq!(b, [i + u8::from(i == 0); 4096]);
        }
    }

    fn gated_volume(size: u64) -> (Arc<Gated>, Arc<Volume>) {
        let opts = FormatOptions::with_size(size);
        let gated = Arc::new(Gated {
            mem: MemoryBackend::new(opts.backing_len().unwrap()).unwrap(),
            gate: Mutex::new((false, 0, false)),
            cv: Condvar::new(),
        });
        drop(Volume::format(gated.clone(), &opts).unwrap());
        let o = OpenOptions {
            background_commit: false,
            ..OpenOptions::default()
        };
        let vol = Arc::new(Volume::open(gated.clone(), &o).unwrap());
        (gated, vol)
    }

    /// A failed round is not a success for the callers waiting on it, and its error is not
    /// lost to them: each one flushes again and gets its own error.
    #[test]
    fn callers_covered_by_a_failed_round_do_not_see_success() {
        let (gated, vol) = gated_volume(4 << 20);
        vol.write_at(&[1u8; 4096], 0).unwrap();
        gated.set(true);
        gated.gate.lock().unwrap().2 = true;
        let first = {
            let vol = vol.clone();
            std::thread::spawn(move || vol.flush())
        };
        gated.wait_held(1);
        let late: Vec<_> = (1..3u64)
            .map(|i| {
                let vol = vol.clone();
                vol.write_at(&[2u8; 4096], i * 4096).unwrap();
                std::thread::spawn(move || vol.flush())
            })
            .collect();
        while waiting(&vol) < 2 {
            std::thread::yield_now();
        }
        gated.set(false);
        assert!(first.join().unwrap().is_err());
        for t in late {
            let e = t.join().unwrap().unwrap_err();
            assert!(e.to_string().contains("gated"), "{e}");
        }
    }

    #[test]
    fn a_read_only_volume_flushes_nothing() {
        let opts = FormatOptions::with_size(1 << 20);
        let mem = Arc::new(MemoryBackend::new(opts.backing_len().unwrap()).unwrap());
        drop(Volume::format(mem.clone(), &opts).unwrap());
        let vol = Volume::open(
            mem,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        vol.flush().unwrap();
        assert_eq!(vol.stats().flush_rounds, 0);
    }
}
