//! An in-memory backend: the reference store for unit and property tests.

use crate::{check_range, Backend};
use std::io;
use std::sync::RwLock;

/// A fixed-size store held in memory. `flush` is a no-op: nothing here survives the process.
#[derive(Debug)]
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
    name: String,
}

impl MemoryBackend {
    /// A zero-filled store of `len` bytes.
    pub fn new(len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds memory"))?;
        Ok(Self::from_vec(vec![0; len]))
    }

    /// A store holding `data` (for example a crash image produced by the fault backend).
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
            name: "memory".to_string(),
        }
    }

    /// A copy of the whole store.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Backend for MemoryBackend {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_refuses_out_of_range() {
        let m = MemoryBackend::new(4096).unwrap();
        m.write_at(b"hello", 100).unwrap();
        let mut buf = [0u8; 5];
        m.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(m.write_at(b"x", 4096).is_err());
        assert!(m.read_at(&mut buf, 4092).is_err());
        m.zero_range(100, 5).unwrap();
        m.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0; 5]);
    }
}
