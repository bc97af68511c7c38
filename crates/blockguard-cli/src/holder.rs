//! Which process holds a volume: for the error of `status` or `scrub` on a volume that is in
//! use but answers on no control socket.
//!
//! First `/proc/locks`, which names the process that took each `flock` (what a server holds on
//! its volume), by device and inode; then, when the lock's owner is not named there (an open
//! file description lock, or another PID namespace), the open descriptors under `/proc/*/fd`.
//! Processes of other users are invisible to an unprivileged caller; the error then says so.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A process that holds a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Holder {
    /// Its process id.
    pub(crate) pid: u32,
    /// Its command line (or command name).
    pub(crate) command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} ({})", self.pid, self.command)
    }
}

/// The processes other than this one that lock or have `path` open, lock holders first.
pub(crate) fn holders(path: &Path) -> Vec<Holder> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_to_string("/proc/locks")
        .map(|text| lockers(&text, dev, ino))
        .unwrap_or_default();
    pids.retain(|&p| p != me);
    if pids.is_empty() {
        pids = openers(dev, ino);
        pids.retain(|&p| p != me);
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| Holder {
            pid,
            command: command_of(pid),
        })
        .collect()
}

/// The pids `/proc/locks` names as holding a lock on the file `dev`/`ino` (waiters excluded).
fn lockers(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let want = (rustix::fs::major(dev), rustix::fs::minor(dev), ino);
    text.lines()
        .filter_map(|line| {
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a waiter has "->" after the id.
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) == Some(&"->") {
                return None;
            }
            let pid: u32 = fields.get(4)?.parse().ok()?;
            let mut id = fields.get(5)?.split(':');
            let major = u32::from_str_radix(id.next()?, 16).ok()?;
            let minor = u32::from_str_radix(id.next()?, 16).ok()?;
            let inode: u64 = id.next()?.parse().ok()?;
            ((major, minor, inode) == want && pid > 0).then_some(pid)
        })
        .collect()
}

/// The pids with a descriptor open on the file `dev`/`ino`.
fn openers(dev: u64, ino: u64) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    // `metadata` follows the descriptor's link to the open file itself.
                    std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
                })
            })
        })
        .collect()
}

/// A process's command line, arguments separated by spaces (its name if that is unreadable).
fn command_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.is_empty() {
        return std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or_else(|_| "command unknown".into(), |c| c.trim_end().to_string());
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_parsed_by_device_and_inode() {
        let dev = rustix::fs::makedev(0xfd, 0x01);
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 999 fd:01:5678 0 EOF\n\
                    2: POSIX  ADVISORY  READ 77 fd:01:9999 0 EOF\n\
                    3: OFDLCK ADVISORY  WRITE -1 fd:01:5678 0 EOF\n\
                    4: FLOCK  ADVISORY  READ 4321 103:02:5678 0 EOF\n\
                    garbage\n";
        assert_eq!(lockers(text, dev, 5678), [1234]);
        assert_eq!(lockers(text, rustix::fs::makedev(0x103, 2), 5678), [4321]);
        assert!(lockers(text, dev, 1).is_empty());
    }

    #[test]
    fn a_process_holding_a_locked_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held");
        std::fs::write(&path, b"x").unwrap();
        // A child that locks the file and waits: `flock -x FILE sleep`.
        let mut child = std::process::Command::new("flock")
            .arg("-x")
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let h = holders(&path);
            if !h.is_empty() || std::time::Instant::now() > deadline {
                break h;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        // flock(1) takes the lock, then runs sleep as its child with the descriptor inherited:
        // /proc/locks names the one that took it.
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, child.id());
        assert!(found[0].command.contains("flock"), "{found:?}");
    }
}
