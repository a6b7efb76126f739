//! Finding the Parquet files of a split: the local mirror first, then the hf-hub cache (offline),
//! then a download through hf-hub when allowed.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::catalogue::DatasetEntry;
use crate::error::DataError;
use crate::examples::Source;
use crate::models::{hub_cached, hub_download, offline_from_env};

/// The files of one split and where they were found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub files: Vec<PathBuf>,
    pub source: Source,
}

/// The datasets shipped in the repository (`data/` at the workspace root: the small local-only
/// ones, data/README.md): `data/` under the current directory (the checkout `just` runs in), else
/// the checkout this binary was built from, when either exists.
pub fn shipped_data_dir() -> Option<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let here = std::env::current_dir().ok().map(|d| d.join("data"));
    here.into_iter()
        .chain(std::iter::once(built))
        .find(|d| d.join("README.md").is_file())
}

/// Resolution settings.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The local mirror directory (`<dir>/<folder>/<file>`).
    pub data_dir: Option<PathBuf>,
    /// The repository's shipped datasets ([`shipped_data_dir`]), after the mirror.
    pub shipped_dir: Option<PathBuf>,
    /// The hf-hub cache (`$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub hub_cache: PathBuf,
    /// Never download; resolve from the mirror and the cache only.
    pub offline: bool,
    /// A folder shared by one run's processes: a repository whose download failed once is not
    /// tried again in that run (`attempts.rs`).
    pub hub_attempts: Option<PathBuf>,
}

impl Resolver {
    /// `data_dir` must exist when given; `origin` says who set it, for the error message.
    pub fn new(
        data_dir: Option<PathBuf>,
        origin: &str,
        hub_cache: PathBuf,
        offline: bool,
    ) -> Result<Self, DataError> {
        if let Some(dir) = &data_dir {
            if !dir.is_dir() {
                return Err(DataError::NoDataDir {
                    path: dir.clone(),
                    origin: origin.to_string(),
                });
            }
        }
        Ok(Self {
            data_dir,
            shipped_dir: shipped_data_dir(),
            hub_cache,
            offline,
            hub_attempts: None,
        })
    }

    /// From the command line where given, else the environment: `DATAMUX_DATA_DIR`, `HF_HOME`,
    /// `HF_HUB_OFFLINE` (hf-hub itself does not read the last one).
    pub fn from_env(data_dir: Option<PathBuf>, offline: bool) -> Result<Self, DataError> {
        let (dir, origin) = match data_dir {
            Some(d) => (Some(d), "--data-dir"),
            None => (
                std::env::var_os("DATAMUX_DATA_DIR").map(PathBuf::from),
                "DATAMUX_DATA_DIR",
            ),
        };
        Self::new(
            dir,
            origin,
            Cache::from_env().path().clone(),
            offline || offline_from_env(),
        )
    }

    /// The files of `split`, from the first location that has all of them.
    pub fn resolve(&self, entry: &DatasetEntry, split: &str) -> Result<Resolved, DataError> {
        if !entry.has_split(split) {
            return Err(DataError::UnknownSplit {
                dataset: entry.name.clone(),
                split: split.to_string(),
                available: entry.splits(),
            });
        }
        let mut looked = Vec::new();
        let mut hints = Vec::new();
        if let Some(local) = &entry.local {
            if let Some(files) = local.files.get(split) {
                if self.data_dir.is_none() {
                    looked.push(format!(
                        "<data dir>/{}/{} (no data directory set)",
                        local.folder,
                        files.join(", ")
                    ));
                }
                // The mirror wins where it has the folder; the shipped copy comes next.
                for dir in self.data_dir.iter().chain(&self.shipped_dir) {
                    let folder = dir.join(&local.folder);
                    let paths: Vec<PathBuf> = files.iter().map(|f| folder.join(f)).collect();
                    if paths.iter().all(|p| p.is_file()) {
                        return Ok(Resolved {
                            files: paths,
                            source: Source::Local { folder },
                        });
                    }
                    looked.extend(paths.iter().map(|p| p.display().to_string()));
                }
                hints.push(format!(
                    "put {} under <data dir>/{}/ and pass --data-dir or set DATAMUX_DATA_DIR",
                    files.join(", "),
                    local.folder
                ));
            }
        }
        if let Some(hub) = &entry.hub {
            if let Some(files) = hub.files.get(split) {
                let repo =
                    Repo::with_revision(hub.repo.clone(), RepoType::Dataset, hub.revision.clone());
                if let Some(cached) = hub_cached(&self.hub_cache, &repo, files) {
                    return Ok(Resolved {
                        files: cached,
                        source: Source::Hub {
                            repo: hub.repo.clone(),
                            revision: hub.revision.clone(),
                        },
                    });
                }
                looked.extend(files.iter().map(|f| {
                    format!(
                        "{}@{}/{} in the hf-hub cache {}",
                        hub.repo,
                        hub.revision,
                        f,
                        self.hub_cache.display()
                    )
                }));
                if self.offline {
                    hints.push(format!("allow downloads (unset HF_HUB_OFFLINE, drop --offline) to fetch it from {}", hub.repo));
                } else {
                    return self.download(entry, split, hub, repo, files, looked);
                }
            }
        }
        Err(DataError::NotFound {
            dataset: entry.name.clone(),
            split: split.to_string(),
            looked,
            hint: format!("To provide it: {}.", hints.join("; or ")),
        })
    }

    fn download(
        &self,
        entry: &DatasetEntry,
        split: &str,
        hub: &crate::catalogue::Hub,
        repo: Repo,
        files: &[String],
        looked: Vec<String>,
    ) -> Result<Resolved, DataError> {
        let attempt = || hub_download(&self.hub_cache, repo, files);
        let marks = self.hub_attempts.as_deref();
        let paths =
            crate::attempts::once(marks, &hub.repo, attempt).map_err(|(file, message)| {
                DataError::Download {
                    dataset: entry.name.clone(),
                    split: split.to_string(),
                    what: format!("{file} from {}@{}", hub.repo, hub.revision),
                    message,
                    looked,
                }
            })?;
        Ok(Resolved {
            files: paths,
            source: Source::Hub {
                repo: hub.repo.clone(),
                revision: hub.revision.clone(),
            },
        })
    }
}

/// The local folder of a dataset: under the data directory where it has it, else the shipped
/// one; `None` when neither has it.
pub fn local_folder(resolver: &Resolver, entry: &DatasetEntry) -> Option<PathBuf> {
    let name = &entry.local.as_ref()?.folder;
    resolver
        .data_dir
        .iter()
        .chain(&resolver.shipped_dir)
        .map(|d| d.join(name))
        .find(|f| f.is_dir())
}

/// Whether `path` looks like a Parquet file (its magic bytes), to report a clear error for other
/// files placed under a Parquet name.
pub fn is_parquet(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PAR1"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalogue;

    /// The shipped `data/` answers without a data directory; a mirror that has the folder wins.
    #[test]
    fn shipped_data_without_a_data_directory_and_the_mirror_first()
    -> Result<(), Box<dyn std::error::Error>> {
        let cat = Catalogue::builtin()?;
        let entry = cat.get("rt-snippets")?;
        let empty = tempfile::tempdir()?;
        let mut resolver = Resolver::new(None, "test", empty.path().to_path_buf(), true)?;
        // Read at run time: a test binary built from another checkout that shares the target
        // folder (CI) would otherwise look in that checkout, which may be gone.
        let root = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").ok_or("no manifest dir")?)
            .join("../..");
        resolver.shipped_dir = Some(root.join("data"));
        let shipped = resolver.resolve(entry, "test")?;
        let Source::Local { folder } = &shipped.source else {
            panic!("{:?}", shipped.source)
        };
        assert!(folder.ends_with("data/rt-snippets"), "{}", folder.display());
        let mirror = root.join("fixtures/mirror");
        resolver.data_dir = Some(mirror.clone());
        let Source::Local { folder } = resolver.resolve(entry, "test")?.source else {
            panic!("not local")
        };
        assert_eq!(folder, mirror.join("rt-snippets"));
        // Neither: the error still names where it looked.
        resolver.data_dir = None;
        resolver.shipped_dir = None;
        let err = resolver.resolve(entry, "test").unwrap_err().to_string();
        assert!(err.contains("no data directory set"), "{err}");
        Ok(())
    }

    /// Online, a split that neither the mirror nor the hub gives names the local paths it
    /// looked for beside the hub's error (a DNS failure alone says nothing about the mirror).
    #[test]
    fn a_failed_download_names_the_local_paths_too() -> Result<(), Box<dyn std::error::Error>> {
        let cat = Catalogue::builtin()?;
        let entry = cat.get("mnist")?;
        let mirror = tempfile::tempdir()?;
        let cache = tempfile::tempdir()?;
        let marks = tempfile::tempdir()?;
        // This run already failed on the repository: no network is tried here.
        std::fs::write(
            marks.path().join("ylecun-mnist.failed"),
            "mnist/test-00000-of-00001.parquet\tdns error: failed to lookup address",
        )?;
        let mut resolver = Resolver::new(
            Some(mirror.path().to_path_buf()),
            "test",
            cache.path().to_path_buf(),
            false,
        )?;
        resolver.hub_attempts = Some(marks.path().to_path_buf());
        let err = resolver.resolve(entry, "test").unwrap_err().to_string();
        assert!(err.contains("dns error"), "{err}");
        let local = mirror.path().join("mnist/test.parquet");
        assert!(err.contains(&local.display().to_string()), "{err}");
        Ok(())
    }
}
