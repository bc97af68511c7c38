//! Recycled I/O buffers.
//!
//! Every read reply and write payload needs a buffer of up to the maximum payload size.
//! Allocating them fresh costs zero-filling (Rust requires initialized memory) and, for large
//! ones, page faults on newly mapped memory — several percent of the server's CPU time at
//! high request rates. Buffers are handed back after the reply is sent or the write done and
//! reused; their old contents are always fully overwritten (a read fills the whole buffer or
//! its reply is not sent; a payload is read in full or the connection ends).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Buffers with at most this capacity go to the small list; larger ones to the large list.
const SMALL: usize = 64 * 1024 + 64;

/// Buffers kept for reuse, each with the time it came back, oldest first (buffers are
/// pushed on top and taken from anywhere, so the order stays): a buffer's time is when it
/// was last needed.
#[derive(Debug, Default)]
struct Shelf {
    bufs: Vec<(Vec<u8>, Instant)>,
    /// Capacity of `bufs`, in bytes.
    bytes: usize,
}

/// How many of the most recently returned buffers `take` looks at for one that fits.
const FIT_SEARCH: usize = 16;

impl Shelf {
    /// A buffer for `len` bytes: the most recent one among the last [`FIT_SEARCH`] whose
    /// capacity is at least `len` and at most twice that. A much larger one would pin its
    /// whole capacity behind a small request (a 1 MiB write payload held in a 32 MiB buffer
    /// by the engine's write-back stage, say), a smaller one would be reallocated anyway.
    fn pop_fitting(&mut self, len: usize) -> Option<Vec<u8>> {
        let fits = |(v, _): &(Vec<u8>, Instant)| v.capacity() >= len && v.capacity() / 2 <= len;
        let at = self
            .bufs
            .iter()
            .rev()
            .take(FIT_SEARCH)
            .position(fits)
            .map(|from_top| self.bufs.len() - 1 - from_top)?;
        let (v, _) = self.bufs.remove(at);
        self.bytes -= v.capacity();
        Some(v)
    }

    fn push(&mut self, v: Vec<u8>) {
        self.bytes += v.capacity();
        // Read under the lock, so the times stay in order.
        self.bufs.push((v, Instant::now()));
    }

    /// Frees the buffers back since `before` and not needed since: the oldest, at the bottom.
    fn trim(&mut self, before: Instant) {
        let unused = self.bufs.partition_point(|(_, back)| *back <= before);
        for (v, _) in self.bufs.drain(..unused) {
            self.bytes -= v.capacity();
        }
    }
}

/// A bounded pool of byte buffers. Buffers nobody needed for a while are freed by
/// [`BufferPool::trim`], so memory taken in a burst (or by clients that have gone) goes back
/// to the system.
#[derive(Debug)]
pub struct BufferPool {
    small: Mutex<Shelf>,
    large: Mutex<Shelf>,
    /// Most small buffers kept.
    max_small: usize,
    /// Most bytes of capacity kept in large buffers.
    max_large_bytes: usize,
}

impl Default for BufferPool {
    /// 256 small buffers and 192 MiB of large ones: enough for the engine's write-back stage
    /// (which keeps write payloads until their data is on disk: up to three times its 32 MiB
    /// default) plus the requests of a few busy connections.
    fn default() -> Self {
        Self::new(256, 192 << 20)
    }
}

fn lock(m: &Mutex<Shelf>) -> std::sync::MutexGuard<'_, Shelf> {
    // A shelf is a plain list of spare buffers: nothing to be inconsistent after a panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BufferPool {
    /// A pool keeping at most `max_small` small buffers and `max_large_bytes` of large ones.
    pub fn new(max_small: usize, max_large_bytes: usize) -> Self {
        Self {
            small: Mutex::new(Shelf::default()),
            large: Mutex::new(Shelf::default()),
            max_small,
            max_large_bytes,
        }
    }

    /// A buffer of exactly `len` bytes with unspecified (but initialized) contents.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len == 0 {
            return Vec::new();
        }
        let recycled = if len <= SMALL {
            lock(&self.small).pop_fitting(len)
        } else {
            lock(&self.large).pop_fitting(len)
        };
        match recycled {
            Some(mut v) => {
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    // Only the growth (within the capacity) is zero-filled.
                    v.resize(len, 0);
                }
                v
            }
            None => vec![0; len],
        }
    }

    /// Returns a buffer for reuse (dropped if the pool is full). Its initialized length is
    /// what a later `take` can hand out without zero-filling.
    pub fn give(&self, v: Vec<u8>) {
        if v.is_empty() {
            return;
        }
        if v.capacity() <= SMALL {
            let mut l = lock(&self.small);
            if l.bufs.len() < self.max_small {
                l.push(v);
            }
        } else {
            let mut l = lock(&self.large);
            if l.bytes + v.capacity() <= self.max_large_bytes {
                l.push(v);
            }
        }
    }

    /// Frees the buffers that came back at least `unused_for` ago and that no `take` needed
    /// since: a steady load keeps what it uses, memory of a past burst (or of clients that
    /// left) is returned once `unused_for` has passed. Cheap: call it often (a buffer then
    /// goes little later than `unused_for` after its last use, however the calls fall).
    pub fn trim(&self, unused_for: Duration) {
        self.trim_at(Instant::now(), unused_for);
    }

    fn trim_at(&self, now: Instant, unused_for: Duration) {
        let Some(before) = now.checked_sub(unused_for) else {
            return;
        };
        lock(&self.small).trim(before);
        lock(&self.large).trim(before);
    }

    /// Bytes of capacity kept for reuse.
    pub fn kept_bytes(&self) -> usize {
        lock(&self.small).bytes + lock(&self.large).bytes
    }
}

/// A request payload that goes back to its pool when dropped — wherever that happens: an
/// export that keeps write data until it reaches the disk (the engine's write-back stage)
/// drops it later, on another thread, and the buffer is still reused.
pub struct Payload {
    buf: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

impl Payload {
    /// A payload of `len` bytes from `pool` (contents unspecified: the caller overwrites them).
    pub fn take(pool: &Arc<BufferPool>, len: usize) -> Self {
        Self {
            buf: pool.take(len),
            pool: Some(Arc::clone(pool)),
        }
    }

    /// A payload owning `buf`, not returned to any pool.
    pub fn from_vec(buf: Vec<u8>) -> Self {
        Self { buf, pool: None }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.buf.len())
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_with_the_requested_length() {
        let p = BufferPool::new(2, 1 << 20);
        let mut a = p.take(100);
        a.fill(7);
        let ptr = a.as_ptr();
        p.give(a);
        let b = p.take(50);
        assert_eq!((b.len(), b.as_ptr()), (50, ptr));
        p.give(b);
        let c = p.take(80);
        assert_eq!(c.len(), 80);
        assert!(
            c[..50].iter().all(|x| *x == 7),
            "contents are reused, not cleared"
        );
        let big = p.take(1 << 20);
        p.give(big);
        p.give(vec![0; 1 << 20]);
        assert_eq!(p.large.lock().unwrap().bufs.len(), 1, "bounded by bytes");
        assert!(p.take(0).is_empty());
    }

    /// Regression: a 32 MiB read reply buffer came back as a 1 MiB write payload, and the
    /// engine's write-back stage held all 32 MiB of it.
    #[test]
    fn a_buffer_is_only_reused_for_a_request_of_at_least_half_its_size() {
        let p = BufferPool::new(8, 64 << 20);
        p.give(vec![0; 32 << 20]);
        let small = p.take(1 << 20);
        assert!(small.capacity() < 2 << 20, "a 32 MiB buffer served 1 MiB");
        p.give(small);
        let big = p.take(20 << 20);
        assert_eq!(
            big.capacity(),
            32 << 20,
            "the big buffer is still there for big requests"
        );
    }

    #[test]
    fn trim_frees_what_sat_unused_for_the_given_time() {
        let p = BufferPool::new(8, 64 << 20);
        let second = Duration::from_secs(1);
        for _ in 0..4 {
            p.give(vec![0; 1 << 20]);
        }
        let start = Instant::now();
        p.trim_at(start, second);
        assert_eq!(p.kept_bytes(), 4 << 20, "just given back: kept");
        // Two were needed again (at most two at once): those stay.
        let (a, b) = (p.take(1 << 20), p.take(1 << 20));
        p.give(a);
        p.give(b);
        let reused = Instant::now();
        p.trim_at(start + second, second);
        assert_eq!(p.kept_bytes(), 2 << 20, "the two not needed are freed");
        p.trim_at(reused + second / 2, second);
        assert_eq!(p.kept_bytes(), 2 << 20);
        // Regression: a trim freed only what sat unused since the previous trim, so a buffer
        // that came back just after a trim was kept for two intervals. Now it goes once it
        // has been unused for the given time, whenever the previous trim was.
        p.trim_at(reused + second, second);
        assert_eq!(p.kept_bytes(), 0);
    }

    #[test]
    fn payloads_return_to_their_pool_when_dropped_on_any_thread() {
        let p = Arc::new(BufferPool::new(4, 1 << 20));
        let mut a = Payload::take(&p, 4096);
        a.fill(3);
        let ptr = a.as_ptr();
        std::thread::spawn(move || drop(a)).join().unwrap();
        let again = p.take(4096);
        assert_eq!(again.as_ptr(), ptr, "the buffer came back");
        let free = Payload::from_vec(vec![1, 2, 3]);
        assert_eq!(&*free, &[1, 2, 3]);
        drop(free);
        assert!(
            p.small.lock().unwrap().bufs.is_empty(),
            "unpooled payloads stay out"
        );
    }
}
