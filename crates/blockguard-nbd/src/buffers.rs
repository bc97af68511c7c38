//! Recycled I/O buffers.
//!
//! Every read reply and write payload needs a buffer of up to the maximum payload size.
//! Allocating them fresh costs zero-filling (Rust requires initialized memory) and, for large
//! ones, page faults on newly mapped memory — several percent of the server's CPU time at
//! high request rates. Buffers are handed back after the reply is sent or the write done and
//! reused; their old contents are always fully overwritten (a read fills the whole buffer or
//! its reply is not sent; a payload is read in full or the connection ends).

use std::sync::{Arc, Mutex};

/// Buffers with at most this capacity go to the small list; larger ones to the large list.
const SMALL: usize = 64 * 1024 + 64;

/// A bounded pool of byte buffers.
#[derive(Debug)]
pub struct BufferPool {
    small: Mutex<Vec<Vec<u8>>>,
    large: Mutex<(Vec<Vec<u8>>, usize)>,
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

impl BufferPool {
    /// A pool keeping at most `max_small` small buffers and `max_large_bytes` of large ones.
    pub fn new(max_small: usize, max_large_bytes: usize) -> Self {
        Self {
            small: Mutex::new(Vec::new()),
            large: Mutex::new((Vec::new(), 0)),
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
            self.small.lock().unwrap_or_else(|e| e.into_inner()).pop()
        } else {
            let mut l = self.large.lock().unwrap_or_else(|e| e.into_inner());
            let v = l.0.pop();
            if let Some(v) = &v {
                l.1 -= v.capacity();
            }
            v
        };
        match recycled {
            Some(mut v) => {
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    // Only the growth is zero-filled.
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
            let mut l = self.small.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() < self.max_small {
                l.push(v);
            }
        } else {
            let mut l = self.large.lock().unwrap_or_else(|e| e.into_inner());
            if l.1 + v.capacity() <= self.max_large_bytes {
                l.1 += v.capacity();
                l.0.push(v);
            }
        }
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
        assert_eq!(p.large.lock().unwrap().0.len(), 1, "bounded by bytes");
        assert!(p.take(0).is_empty());
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
        assert!(p.small.lock().unwrap().is_empty(), "unpooled payloads stay out");
    }
}
