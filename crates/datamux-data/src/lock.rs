//! Exclusive file locks (`fs4`, the kernel's advisory locks): released when the holder exits,
//! however it exits, so a lock can never be left stale by a killed process (or claimed by an
//! unrelated process that got its PID). The lock files themselves stay: removing one while
//! another process waits on it would let two holders in.

use std::io;
use std::path::{Path, PathBuf};

// The std methods of the same names need Rust 1.89; the MSRV is 1.85: fs4's, called by path.
/// A held lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    file: std::fs::File,
    path: PathBuf,
}

impl Lock {
    /// Take the lock at `path` (created if missing), waiting for its holder; `on_wait` is
    /// called once, before waiting, when another process holds it (to say so).
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        Self::take(file, path, on_wait)
    }

    /// Take the lock of the folder `dir` itself (an open folder can be locked on Linux), so
    /// that a folder of tables needs no lock file in it.
    pub fn folder(dir: &Path, on_wait: impl FnOnce()) -> io::Result<Self> {
        let file = std::fs::File::open(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", dir.display())))?;
        Self::take(file, dir, on_wait)
    }

    fn take(file: std::fs::File, path: &Path, on_wait: impl FnOnce()) -> io::Result<Self> {
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                on_wait();
                fs4::FileExt::lock(&file).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot lock {}: {e}", path.display()))
                })?;
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot lock {}: {e}", path.display()),
                ));
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = Lock::acquire(&path, || panic!("free")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            let _second = Lock::acquire(&p, || tx.send("waiting").unwrap()).unwrap();
        });
        // The second one has said it waits; it gets the lock once the first is dropped.
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            "waiting"
        );
        drop(first);
        t.join().unwrap();
        // A lock file whose holder is gone (a killed process) is free: nothing stale.
        let _again = Lock::acquire(&path, || panic!("stale")).unwrap();
    }
}
