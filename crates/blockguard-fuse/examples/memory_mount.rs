//! Serves an in-memory file over FUSE until unmounted or interrupted — for trying the export
//! (or measuring the FUSE layer alone) without a volume.
//!
//! ```text
//! cargo run --release -p blockguard-fuse --example memory_mount -- /mnt/x 256
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use blockguard_fuse::{mount, MemoryFile, MountConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(mountpoint), Some(mib)) = (args.next(), args.next()) else {
        return Err("usage: memory_mount MOUNTPOINT SIZE_MIB".into());
    };
    let mib: usize = mib.to_str().ok_or("size is not UTF-8")?.parse()?;
    let file = Arc::new(MemoryFile::new(mib << 20, 4096, false));
    let mounted = mount(
        file,
        &PathBuf::from(mountpoint),
        &MountConfig::new("mem.img", "memory"),
    )?;
    println!("mounted at {}", mounted.mountpoint().display());
    let file = mounted.serve()?;
    println!("largest request: {} bytes", file.largest_request());
    Ok(())
}
