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

/// Resolution settings.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The local mirror directory (`<dir>/<folder>/<file>`).
    pub data_dir: Option<PathBuf>,
    /// The hf-hub cache (`$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub hub_cache: PathBuf,
    /// Never download; resolve from the mirror and the cache only.
    pub offline: bool,
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
            hub_cache,
            offline,
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
                match &self.data_dir {
                    Some(dir) => {
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
                    None => looked.push(format!(
                        "<data dir>/{}/{} (no data directory set)",
                        local.folder,
                        files.join(", ")
                    )),
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
                    return self.download(entry, split, hub, repo, files);
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
    ) -> Result<Resolved, DataError> {
        let paths = hub_download(&self.hub_cache, repo, files).map_err(|(file, message)| {
            DataError::Download {
                dataset: entry.name.clone(),
                split: split.to_string(),
                repo: hub.repo.clone(),
                revision: hub.revision.clone(),
                file,
                message,
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

/// The local folder of a dataset under the data directory, if both are known.
pub fn local_folder(resolver: &Resolver, entry: &DatasetEntry) -> Option<PathBuf> {
    Some(
        resolver
            .data_dir
            .as_deref()?
            .join(&entry.local.as_ref()?.folder),
    )
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
