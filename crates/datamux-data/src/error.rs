//! Errors of the data layer. Each keeps the dataset, split and path it concerns and says how to
//! fix the problem; distinct failures are distinct variants.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("catalogue {origin}: {message}")]
    Catalogue { origin: String, message: String },
    #[error(
        "unknown dataset `{name}`; the catalogue{} has: {}. To add one without rebuilding, put a \
         [[dataset]] entry in <data dir>/catalogue.toml (docs/extending.md)",
        file.as_ref().map(|f| format!(" (built in, with {})", f.display())).unwrap_or_default(),
        known.join(", ")
    )]
    UnknownDataset {
        name: String,
        known: Vec<String>,
        file: Option<PathBuf>,
    },
    #[error("dataset `{dataset}` has no split `{split}`; it has: {}", available.join(", "))]
    UnknownSplit {
        dataset: String,
        split: String,
        available: Vec<String>,
    },
    #[error("dataset `{dataset}` has neither a validation nor a test split")]
    NoEvaluationSplit { dataset: String },
    #[error("data directory {} does not exist (set by {origin}); point it at a local mirror such as ../shared/data", path.display())]
    NoDataDir { path: PathBuf, origin: String },
    #[error("dataset `{dataset}` split `{split}` not found; looked for: {}. {hint}", looked.join(", "))]
    NotFound {
        dataset: String,
        split: String,
        looked: Vec<String>,
        hint: String,
    },
    #[error(
        "dataset `{dataset}` split `{split}`: downloading {what} failed: {message}; before that, looked for: {}", looked.join(", ")
    )]
    Download {
        dataset: String,
        split: String,
        /// `<file> from <repo>@<revision>`.
        what: String,
        message: String,
        /// The local places tried first (the mirror, the shipped data, the hf-hub cache).
        looked: Vec<String>,
    },
    #[error("dataset `{dataset}` split `{split}`: cannot read {}: {message}", path.display())]
    Parquet {
        dataset: String,
        split: String,
        path: PathBuf,
        message: String,
    },
    #[error("dataset `{dataset}` split `{split}`: {} has no column `{column}`; it has: {}", path.display(), found.join(", "))]
    MissingColumn {
        dataset: String,
        split: String,
        path: PathBuf,
        column: String,
        found: Vec<String>,
    },
    #[error("dataset `{dataset}` split `{split}`: column `{column}` of {} is {found}, expected {expected}", path.display())]
    WrongDtype {
        dataset: String,
        split: String,
        path: PathBuf,
        column: String,
        expected: String,
        found: String,
    },
    #[error("dataset `{dataset}` split `{split}`: row {row} of {} has a null `{column}`", path.display())]
    Null {
        dataset: String,
        split: String,
        path: PathBuf,
        column: String,
        row: usize,
    },
    #[error("dataset `{dataset}` split `{split}`: row {row} of {} has {what} {value}, outside 0..{count} ({count} labels in the catalogue)", path.display())]
    LabelOutOfRange {
        dataset: String,
        split: String,
        path: PathBuf,
        row: usize,
        what: &'static str,
        value: i64,
        count: usize,
    },
    #[error("dataset `{dataset}` split `{split}`: row {row} of {} has {tokens} tokens but {tags} tags", path.display())]
    TagCount {
        dataset: String,
        split: String,
        path: PathBuf,
        row: usize,
        tokens: usize,
        tags: usize,
    },
    #[error("dataset `{dataset}` split `{split}`: row {row} of {}: {message}", path.display())]
    BadFrames {
        dataset: String,
        split: String,
        path: PathBuf,
        row: usize,
        message: String,
    },
    #[error("dataset `{dataset}` split `{split}`: {} has no rows", path.display())]
    EmptySplit {
        dataset: String,
        split: String,
        path: PathBuf,
    },
    #[error("dataset `{dataset}`: cannot read labels file {}: {message}", path.display())]
    Labels {
        dataset: String,
        path: PathBuf,
        message: String,
    },
    #[error("models folder {} does not exist (set by {origin}); point it at a folder laid out <owner>/<name>/ such as ../shared/models", path.display())]
    NoModelsDir { path: PathBuf, origin: String },
    #[error("model `{repo}`: expected a hub id `owner/name`")]
    BadModelId { repo: String },
    #[error("model `{repo}`: {} is missing (the local folder must hold the repository's files)", path.display())]
    ModelIncomplete { repo: String, path: PathBuf },
    #[error("model `{repo}` not found; looked in: {}. {hint}", looked.join(", "))]
    ModelNotFound {
        repo: String,
        looked: Vec<String>,
        hint: String,
    },
    #[error("model `{repo}`: downloading {file} from {repo}@{revision} failed: {message}")]
    ModelDownload {
        repo: String,
        revision: String,
        file: String,
        message: String,
    },
}
