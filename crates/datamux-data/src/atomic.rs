//! Files and folders written whole or not at all: through a temporary file (or folder) beside
//! the target, renamed into place when the writer succeeds. On every error path the temporary is
//! removed (`tempfile` removes it on drop) and the error names the target and the I/O cause
//! below any library's own message ("No space left on device", not "Invalid thrift").

use std::fmt::Display;
use std::io::{self, Write};
use std::path::Path;

/// A writer that keeps the first I/O error it saw, so that a library which reports its own
/// summary of a failed write (Parquet: "transport error") still lets the cause be told.
pub struct Tracked<W> {
    inner: W,
    error: Option<(io::ErrorKind, String)>,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.keep(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|e| self.keep(e))
    }
}

impl<W> Tracked<W> {
    fn keep(&mut self, e: &io::Error) {
        if self.error.is_none() {
            self.error = Some((e.kind(), e.to_string()));
        }
    }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp-")
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn named(path: &Path, what: &str, e: impl Display) -> io::Error {
    io::Error::other(format!("cannot {what} {}: {e}", path.display()))
}

/// Write `path` with `write`, which gets the temporary file (wrapped by `wrap`: the seam that
/// a test uses to fail the disk) and must write all of it.
pub fn write_through<W: Write, E: Display>(
    path: &Path,
    wrap: impl FnOnce(std::fs::File) -> W,
    write: impl FnOnce(&mut Tracked<W>) -> Result<(), E>,
) -> io::Result<()> {
    let dir = parent(path);
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(dir)
        .map_err(|e| named(dir, "create a file in", e))?;
    let file = tmp.reopen().map_err(|e| named(path, "write", e))?;
    let mut w = Tracked {
        inner: wrap(file),
        error: None,
    };
    let written = write(&mut w).and_then(|()| w.flush().map_err(|e| e.to_string()).or(Ok(())));
    if let Some((kind, cause)) = w.error.take() {
        // The I/O cause, whatever the writer made of it.
        return Err(io::Error::new(
            kind,
            format!("cannot write {}: {cause}", path.display()),
        ));
    }
    written.map_err(|e| named(path, "write", e))?;
    drop(w);
    tmp.as_file()
        .sync_all()
        .map_err(|e| named(path, "write", e))?;
    tmp.persist(path)
        .map_err(|e| named(path, "move into place", e.error))?;
    Ok(())
}

/// [`write_through`] on the plain file.
pub fn write_with<E: Display>(
    path: &Path,
    write: impl FnOnce(&mut Tracked<std::fs::File>) -> Result<(), E>,
) -> io::Result<()> {
    write_through(path, |f| f, write)
}

/// Write `bytes` to `path`.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Write `path` with a writer that takes a path of its own (safetensors, tokenizers, plots):
/// it gets the temporary's path, which ends in the target's extension (a writer that picks
/// the format by it, as plotters does, picks the same).
pub fn write_path<E: Display>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> io::Result<()> {
    let dir = parent(path);
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .suffix(&suffix)
        .tempfile_in(dir)
        .map_err(|e| named(dir, "create a file in", e))?;
    write(tmp.path()).map_err(|e| named(path, "write", e))?;
    tmp.persist(path)
        .map_err(|e| named(path, "move into place", e.error))?;
    Ok(())
}

/// Write the folder `dir` whole: `write` fills a temporary folder beside it, which then
/// replaces `dir` (an earlier, broken one included). The caller holds the lock that makes it
/// the only writer of `dir`.
pub fn write_dir<E: Display>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> io::Result<()> {
    let up = parent(dir);
    std::fs::create_dir_all(up).map_err(|e| named(up, "create", e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(dir))
        .tempdir_in(up)
        .map_err(|e| named(up, "create a folder in", e))?;
    write(tmp.path()).map_err(|e| named(dir, "write", e))?;
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(named(dir, "replace", e)),
        _ => {}
    }
    std::fs::rename(tmp.path(), dir).map_err(|e| named(dir, "move into place", e))?;
    // Renamed: nothing left for the guard to remove.
    let _ = tmp.keep();
    Ok(())
}

/// The text of `path`, `None` when there is no such file (a table or settings file not
/// written yet); any other error names the path.
pub fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// Remove the temporaries of this module's writers in `dir` (`.<name>.tmp-*`, files or
/// folders): those of a process killed while writing. Only for a caller that holds the lock
/// every writer of `dir` holds, so that no live writer's temporary is taken.
pub fn remove_stale(dir: &Path) -> io::Result<()> {
    remove_temporaries(dir, |name| name.starts_with('.') && name.contains(".tmp-"))
}

/// [`remove_stale`] for the temporaries of one target (`path`'s, beside it): for the holder of
/// a lock on that target alone (a checkpoint folder).
pub fn remove_stale_of(path: &Path) -> io::Result<()> {
    let prefix = temp_prefix(path);
    remove_temporaries(parent(path), |name| name.starts_with(&prefix))
}

fn remove_temporaries(dir: &Path, is_temporary: impl Fn(&str) -> bool) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(named(dir, "read", e)),
    };
    for e in entries {
        let e = e.map_err(|e| named(dir, "read", e))?;
        if !is_temporary(&e.file_name().to_string_lossy()) {
            continue;
        }
        let path = e.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(named(&path, "remove", e));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that fills after `room` bytes.
    struct Full<W> {
        inner: W,
        room: usize,
    }

    impl<W: Write> Write for Full<W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.len() > self.room {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.room -= buf.len();
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_full_disk_leaves_the_old_file_and_no_temporary_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_bytes(&path, b"old").unwrap();
        let err = write_through(
            &path,
            |f| Full { inner: f, room: 2 },
            // A library that hides the cause behind its own message.
            |w| w.write_all(b"new contents").map_err(|_| "transport error"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("No space left on device"), "{msg}");
        assert!(msg.contains("t.bin"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["t.bin"]);
    }

    #[test]
    fn a_failed_writer_leaves_no_temporary_file_or_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_path(&dir.path().join("a.json"), |p| {
            std::fs::write(p, "half")?;
            Err::<(), io::Error>(io::Error::other("tokenizer failed"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.json") && err.to_string().contains("tokenizer failed"));
        let ckpt = dir.path().join("ckpt");
        write_dir(&ckpt, |d| std::fs::write(d.join("model"), "1")).unwrap();
        let err = write_dir(&ckpt, |d| {
            std::fs::write(d.join("model"), "2")?;
            Err::<(), io::Error>(io::Error::other("killed"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("killed"));
        // The finished folder stays as it was; no temporary is left beside it.
        assert_eq!(std::fs::read_to_string(ckpt.join("model")).unwrap(), "1");
        assert_eq!(entries(dir.path()), ["ckpt"]);
    }
}
