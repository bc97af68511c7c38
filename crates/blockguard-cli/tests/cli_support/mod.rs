//! Shared helpers of the command-line tests: run the real binary in a temp directory and
//! check what it printed and how it exited.

#![allow(dead_code)]

use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What one run of the binary produced.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts the exit code; on failure shows everything the run printed.
    #[track_caller]
    pub fn code(&self, want: i32) -> &Self {
        assert_eq!(
            self.code, want,
            "exit code {} (want {want})\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts stderr mentions every one of `parts`.
    #[track_caller]
    pub fn err_has(&self, parts: &[&str]) -> &Self {
        for p in parts {
            assert!(self.stderr.contains(p), "stderr lacks {p:?}:\n{}", self.stderr);
        }
        self
    }

    /// Asserts stdout mentions every one of `parts`.
    #[track_caller]
    pub fn out_has(&self, parts: &[&str]) -> &Self {
        for p in parts {
            assert!(self.stdout.contains(p), "stdout lacks {p:?}:\n{}", self.stdout);
        }
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `blockguard args…` in `dir`.
pub fn run_in(dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_blockguard"))
        .args(args)
        .current_dir(dir)
        .env("BLOCKGUARD_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run blockguard");
    let o = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !o.stderr.contains("panicked") && !o.stdout.contains("panicked"),
        "blockguard {args:?} panicked:\n{}",
        o.stderr
    );
    assert!(
        o.code >= 0,
        "blockguard {args:?} was killed by a signal:\n{}",
        o.stderr
    );
    o
}

/// A temp directory and shorthands for running commands in it.
pub struct T {
    pub dir: tempfile::TempDir,
}

impl T {
    pub fn new() -> T {
        T {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn run(&self, args: &[&str]) -> Out {
        run_in(self.dir.path(), args)
    }
    /// Formats `name` with extra arguments; must succeed.
    pub fn format(&self, name: &str, extra: &[&str]) -> Value {
        let mut args = vec!["format", name, "--json"];
        args.extend_from_slice(extra);
        self.run(&args).code(0).json()
    }
    pub fn info(&self, name: &str) -> Value {
        self.run(&["info", name, "--json"]).code(0).json()
    }
    /// Writes `data` into a new raw file.
    pub fn raw(&self, name: &str, data: &[u8]) {
        fs::write(self.path(name), data).unwrap();
    }
    pub fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(name)).unwrap()
    }
    pub fn len(&self, name: &str) -> u64 {
        fs::metadata(self.path(name)).unwrap().len()
    }
    /// XORs `mask` into the byte at `offset` of file `name` (never a no-op).
    pub fn flip(&self, name: &str, offset: u64, mask: u8) {
        assert_ne!(mask, 0);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(name))
            .unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= mask;
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&b).unwrap();
    }
    pub fn write_at(&self, name: &str, offset: u64, data: &[u8]) {
        let mut f = OpenOptions::new().write(true).open(self.path(name)).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(data).unwrap();
    }
    pub fn read_at(&self, name: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(self.path(name)).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact(&mut b).unwrap();
        b
    }
    /// Byte offset of data block `block`, as `dump` reports it.
    pub fn data_offset(&self, name: &str, block: u64) -> u64 {
        let d = self
            .run(&["dump", name, "--block", &block.to_string(), "--json"])
            .code(0)
            .json();
        d["blocks"][0]["location"]["data_offset"].as_u64().unwrap()
    }
    /// `dump NAME --block BLOCK --json` with extra arguments; must succeed.
    pub fn dump(&self, name: &str, block: u64, extra: &[&str]) -> Value {
        let b = block.to_string();
        let mut args = vec!["dump", name, "--block", &b, "--json"];
        args.extend_from_slice(extra);
        self.run(&args).code(0).json()
    }
}
