//! Finding the files of a pretrained model repository: the local models folder first
//! (`<models dir>/<owner>/<name>/`, as `../shared/models`), then the hf-hub cache (offline), then
//! a download through hf-hub when allowed. The same order as datasets ([`crate::resolve`]).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::DataError;

/// Where a model's files were found, for the tables' provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The local models folder, `<models dir>/<owner>/<name>/`.
    Local { folder: PathBuf },
    /// The hf-hub cache, after a download or from an earlier one.
    Hub { repo: String, revision: String },
}

/// The requested files of one model repository, in the order asked for.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub repo: String,
    pub files: Vec<PathBuf>,
    pub source: ModelSource,
}

/// Model resolution settings.
#[derive(Debug, Clone)]
pub struct ModelResolver {
    /// The local models folder (`<dir>/<owner>/<name>/<file>`).
    pub models_dir: Option<PathBuf>,
    /// The hf-hub cache (`$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub hub_cache: PathBuf,
    /// Never download.
    pub offline: bool,
    /// A folder shared by one run's processes: a repository whose download failed once is not
    /// tried again in that run (`attempts.rs`).
    pub hub_attempts: Option<PathBuf>,
}

impl ModelResolver {
    /// From the command line where given, else the environment: `DATAMUX_MODELS_DIR`,
    /// `HF_HOME`, `HF_HUB_OFFLINE`. A models folder that is named must exist.
    pub fn from_env(models_dir: Option<PathBuf>, offline: bool) -> Result<Self, DataError> {
        let (dir, origin) = match models_dir {
            Some(d) => (Some(d), "--models-dir"),
            None => (
                std::env::var_os("DATAMUX_MODELS_DIR").map(PathBuf::from),
                "DATAMUX_MODELS_DIR",
            ),
        };
        if let Some(dir) = &dir {
            if !dir.is_dir() {
                return Err(DataError::NoModelsDir {
                    path: dir.clone(),
                    origin: origin.to_string(),
                });
            }
        }
        Ok(Self {
            models_dir: dir,
            hub_attempts: None,
            hub_cache: Cache::from_env().path().clone(),
            offline: offline || offline_from_env(),
        })
    }

    /// `files` of the model `repo` (`owner/name`) at `revision` (the hub's default branch when
    /// `None`). The local folder holds one unversioned copy, so it answers only when no revision
    /// is asked for; a local folder that exists must hold every file (it is what the user meant).
    pub fn resolve(
        &self,
        repo: &str,
        revision: Option<&str>,
        files: &[&str],
    ) -> Result<ResolvedModel, DataError> {
        if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
            return Err(DataError::BadModelId {
                repo: repo.to_string(),
            });
        }
        let mut looked = Vec::new();
        let mut hints = Vec::new();
        if let (Some(dir), None) = (&self.models_dir, revision) {
            let folder = dir.join(repo);
            if folder.is_dir() {
                let paths: Vec<PathBuf> = files.iter().map(|f| folder.join(f)).collect();
                if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
                    return Err(DataError::ModelIncomplete {
                        repo: repo.to_string(),
                        path: missing.clone(),
                    });
                }
                return Ok(ResolvedModel {
                    repo: repo.to_string(),
                    files: paths,
                    source: ModelSource::Local { folder },
                });
            }
            looked.push(folder.display().to_string());
        } else if self.models_dir.is_none() {
            looked.push(format!("<models dir>/{repo}/ (no models folder set)"));
        }
        hints.push(format!(
            "put the repository's {} under <models dir>/{repo}/ and pass --models-dir or set \
             DATAMUX_MODELS_DIR",
            files.join(", ")
        ));
        let revision = revision.unwrap_or("main").to_string();
        let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.clone());
        let source = ModelSource::Hub {
            repo: repo.to_string(),
            revision: revision.clone(),
        };
        if let Some(files) = hub_cached(&self.hub_cache, &hub_repo, files) {
            return Ok(ResolvedModel {
                repo: repo.to_string(),
                files,
                source,
            });
        }
        looked.push(format!(
            "{repo}@{revision} in the hf-hub cache {}",
            self.hub_cache.display()
        ));
        if self.offline {
            hints.push(
                "allow downloads (unset HF_HUB_OFFLINE, drop --offline) to fetch it from the hub"
                    .to_string(),
            );
            return Err(DataError::ModelNotFound {
                repo: repo.to_string(),
                looked,
                hint: format!("To provide it: {}.", hints.join("; or ")),
            });
        }
        let attempt = || hub_download(&self.hub_cache, hub_repo, files);
        let marks = self.hub_attempts.as_deref();
        let paths = crate::attempts::once(marks, repo, attempt).map_err(|(file, message)| {
            DataError::ModelDownload {
                repo: repo.to_string(),
                revision: revision.clone(),
                file,
                message,
            }
        })?;
        Ok(ResolvedModel {
            repo: repo.to_string(),
            files: paths,
            source,
        })
    }
}

/// Whether `HF_HUB_OFFLINE` forbids downloads (hf-hub itself does not read it).
pub(crate) fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `files` of `repo` in the hf-hub cache at `cache`, when every one of them is there.
pub(crate) fn hub_cached<S: AsRef<str>>(
    cache: &Path,
    repo: &Repo,
    files: &[S],
) -> Option<Vec<PathBuf>> {
    let cache = Cache::new(cache.to_path_buf()).repo(repo.clone());
    files.iter().map(|f| cache.get(f.as_ref())).collect()
}

/// Download `files` of `repo` into the hf-hub cache at `cache`; a failure names the file
/// (`(client)` when the client could not be built) and says why.
pub(crate) fn hub_download<S: AsRef<str>>(
    cache: &Path,
    repo: Repo,
    files: &[S],
) -> Result<Vec<PathBuf>, (String, String)> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(|e| ("(client)".to_string(), e.to_string()))?;
    let api_repo = api.repo(repo);
    files
        .iter()
        .map(|f| {
            api_repo
                .get(f.as_ref())
                .map_err(|e| (f.as_ref().to_string(), e.to_string()))
        })
        .collect()
}

impl ResolvedModel {
    /// The folder the first file lies in (the snapshot or the local folder).
    pub fn folder(&self) -> Option<&Path> {
        self.files.first().and_then(|p| p.parent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(models_dir: Option<PathBuf>, cache: PathBuf) -> ModelResolver {
        ModelResolver {
            models_dir,
            hub_cache: cache,
            offline: true,
            hub_attempts: None,
        }
    }

    /// The local folder wins, an incomplete one is an error naming the missing file, a cached
    /// snapshot answers next, and nothing found offline names every place looked at.
    #[test]
    fn local_folder_then_hub_cache_then_a_clear_error() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let (models, cache) = (tmp.path().join("models"), tmp.path().join("hub"));
        std::fs::create_dir_all(models.join("acme/local-bert"))?;
        std::fs::write(models.join("acme/local-bert/config.json"), "{}")?;
        let snap = cache.join("models--acme--cached-bert/snapshots/abc123");
        std::fs::create_dir_all(&snap)?;
        std::fs::write(snap.join("config.json"), "{}")?;
        std::fs::create_dir_all(cache.join("models--acme--cached-bert/refs"))?;
        std::fs::write(cache.join("models--acme--cached-bert/refs/main"), "abc123")?;
        let r = resolver(Some(models.clone()), cache.clone());

        let local = r.resolve("acme/local-bert", None, &["config.json"])?;
        assert_eq!(
            local.files,
            vec![models.join("acme/local-bert/config.json")]
        );
        let err = r
            .resolve(
                "acme/local-bert",
                None,
                &["config.json", "model.safetensors"],
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("acme/local-bert") && err.contains("model.safetensors"),
            "{err}"
        );
        let hub = r.resolve("acme/cached-bert", None, &["config.json"])?;
        assert_eq!(hub.files, vec![snap.join("config.json")]);
        assert!(matches!(hub.source, ModelSource::Hub { .. }));

        let err = r
            .resolve("acme/nowhere", None, &["config.json"])
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "one line: {err}");
        for part in [
            "acme/nowhere",
            "hf-hub cache",
            "DATAMUX_MODELS_DIR",
            "HF_HUB_OFFLINE",
        ] {
            assert!(err.contains(part), "`{part}` missing from: {err}");
        }
        let err = r.resolve("no-owner", None, &["config.json"]).unwrap_err();
        assert!(err.to_string().contains("owner/name"), "{err}");
        Ok(())
    }
}
