//! One download attempt per hub repository per run. Without it, an unreachable hub costs every
//! split of every job its own attempt (hf-hub's connection timeout and retries, about 90 s each,
//! measured on a machine without network). `datamux run` names a folder shared by its worker
//! processes; the first process to fail on a repository leaves a mark there, and every later
//! attempt on that repository fails at once with the first one's message. An exclusive lock per
//! repository makes a second worker wait for the first attempt instead of making its own.

use std::io::Write;
use std::path::Path;

/// Run `attempt` (a download from `repo`) unless an earlier one in this run failed; with no
/// folder (`marks` is `None`) every call attempts. Errors are `(file, message)`, as the
/// downloads give them.
pub(crate) fn once<T>(
    marks: Option<&Path>,
    repo: &str,
    attempt: impl FnOnce() -> Result<T, (String, String)>,
) -> Result<T, (String, String)> {
    let Some(dir) = marks else {
        return attempt();
    };
    let io = |e: std::io::Error| ("(attempts)".to_string(), format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name: String = repo
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let lock = std::fs::File::create(dir.join(format!("{name}.lock"))).map_err(io)?;
    // Held until the function returns (the lock goes with the file).
    fs4::FileExt::lock(&lock).map_err(io)?;
    let mark = dir.join(format!("{name}.failed"));
    if let Ok(first) = std::fs::read_to_string(&mark) {
        let (file, message) = first.split_once('\t').unwrap_or(("(hub)", first.as_str()));
        return Err((
            file.to_string(),
            format!("{message} (the first attempt of this run; not tried again)"),
        ));
    }
    let out = attempt();
    if let Err((file, message)) = &out {
        let line = format!("{file}\t{}", message.replace(['\n', '\t'], " "));
        std::fs::File::create(&mark)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(io)?;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_repository_is_not_tried_again_in_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let tries = std::cell::Cell::new(0);
        let fail = || {
            tries.set(tries.get() + 1);
            Err::<(), _>(("a.parquet".to_string(), "connection refused".to_string()))
        };
        let first = once(Some(dir.path()), "owner/data", fail).unwrap_err();
        assert_eq!(first.1, "connection refused");
        let second = once(Some(dir.path()), "owner/data", fail).unwrap_err();
        assert_eq!(second.0, "a.parquet");
        assert!(
            second
                .1
                .starts_with("connection refused (the first attempt"),
            "{second:?}"
        );
        assert_eq!(tries.get(), 1);
        // Another repository, and a run without a folder, still attempt.
        assert!(
            once(
                Some(dir.path()),
                "owner/other",
                || Ok::<_, (String, String)>(3)
            )
            .is_ok()
        );
        assert!(once(None, "owner/data", fail).is_err());
        assert_eq!(tries.get(), 2);
    }
}
