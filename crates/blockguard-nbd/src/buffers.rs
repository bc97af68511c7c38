//! Recycled I/O buffers.
//!
//! Every read reply and write payload needs a buffer of up to the maximum payload size.
//! Allocating them fresh costs zero-filling (Rust requires initialized memory) and, for large
//! ones, page faults on newly mapped memory — several percent of the server's CPU time at
//! high request rates. Buffers are handed back after the reply is sent or the write done and
//! reused; their old contents are always fully overwritten (a read fills the whole buffer or
//! its reply is not sent; a payload is read in full or the connection ends).

use std::sync::Mutex;

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
    fn default() -> Self {
        Self::new(256, 64 << 20)
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
}
