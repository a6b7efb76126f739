//! The examples of a split as plain Rust columns, by dataset kind. Nothing here links polars: a
//! modality crate takes these types without the `io` feature.

use std::path::PathBuf;

/// Sequences of fixed-width feature frames (MFCCs, filterbanks, sensor readings): clip `i` is
/// `values[i]`, `values[i].len() / dim` frames of `dim` numbers each, frame-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    /// Numbers per frame.
    pub dim: usize,
    pub values: Vec<Vec<f32>>,
}

impl Frames {
    /// Frames of clip `i`.
    pub fn frames(&self, i: usize) -> usize {
        self.values[i].len() / self.dim.max(1)
    }
}

/// The examples of a split, by dataset kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Examples {
    /// Encoded image bytes (PNG/JPEG) and label ids.
    Images {
        images: Vec<Vec<u8>>,
        labels: Vec<u32>,
    },
    /// Sentences, optional second sentences, label ids.
    Text {
        texts: Vec<String>,
        pairs: Option<Vec<String>>,
        labels: Vec<u32>,
    },
    /// Pre-split words and one tag id per word.
    Tokens {
        tokens: Vec<Vec<String>>,
        tags: Vec<Vec<u32>>,
    },
    /// Non-empty text lines.
    Corpus { texts: Vec<String> },
    /// A sequence of feature frames and a label id per example.
    Frames { frames: Frames, labels: Vec<u32> },
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Self::Images { labels, .. }
            | Self::Text { labels, .. }
            | Self::Frames { labels, .. } => labels.len(),
            Self::Tokens { tags, .. } => tags.len(),
            Self::Corpus { texts } => texts.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Self {
        fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
            idx.iter().map(|i| v[*i].clone()).collect()
        }
        match self {
            Self::Images { images, labels } => Self::Images {
                images: pick(images, idx),
                labels: pick(labels, idx),
            },
            Self::Text {
                texts,
                pairs,
                labels,
            } => Self::Text {
                texts: pick(texts, idx),
                pairs: pairs.as_ref().map(|p| pick(p, idx)),
                labels: pick(labels, idx),
            },
            Self::Tokens { tokens, tags } => Self::Tokens {
                tokens: pick(tokens, idx),
                tags: pick(tags, idx),
            },
            Self::Corpus { texts } => Self::Corpus {
                texts: pick(texts, idx),
            },
            Self::Frames { frames, labels } => Self::Frames {
                frames: Frames {
                    dim: frames.dim,
                    values: pick(&frames.values, idx),
                },
                labels: pick(labels, idx),
            },
        }
    }
}

/// Where a split's files came from, recorded in the results tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local { folder: PathBuf },
    Hub { repo: String, revision: String },
}

impl Source {
    /// A short description for the `data_source` column: `local:<folder>` or `hub:<repo>@<rev>`.
    pub fn describe(&self) -> String {
        match self {
            Self::Local { folder } => format!("local:{}", folder.display()),
            Self::Hub { repo, revision } => format!("hub:{repo}@{revision}"),
        }
    }
}

/// One loaded split with its provenance.
#[derive(Debug, Clone)]
pub struct Split {
    pub dataset: String,
    pub split: String,
    pub source: Source,
    pub files: Vec<PathBuf>,
    pub label_names: Vec<String>,
    /// The file row of each example, for errors that must name it after a holdout or a limit
    /// reordered the examples (`(file, row)`, indexing `files`).
    pub rows: Vec<(usize, usize)>,
    pub examples: Examples,
}

impl Split {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The examples at `idx`, in that order, with their file rows.
    pub fn select(&self, idx: &[usize]) -> Self {
        Self {
            dataset: self.dataset.clone(),
            split: self.split.clone(),
            source: self.source.clone(),
            files: self.files.clone(),
            label_names: self.label_names.clone(),
            rows: idx
                .iter()
                .map(|i| self.rows.get(*i).copied().unwrap_or((0, *i)))
                .collect(),
            examples: self.examples.select(idx),
        }
    }

    /// An error about example `i`, placed where a user finds it: the dataset, the split, the
    /// file (its path) and the file's own row, whatever order a holdout or a limit put the
    /// examples in. A leading `row <i>: ` or `example <i>: ` of `message` (the position in this
    /// split) is dropped.
    pub fn error_at(&self, i: usize, message: &str) -> String {
        let message = message
            .strip_prefix(&format!("row {i}: "))
            .or_else(|| message.strip_prefix(&format!("example {i}: ")))
            .unwrap_or(message);
        let (file, row) = self.rows.get(i).copied().unwrap_or((0, i));
        let file = self
            .files
            .get(file)
            .map_or_else(|| "?".into(), |f| f.display().to_string());
        format!(
            "dataset `{}` split `{}`, {file} row {row}: {message}",
            self.dataset, self.split
        )
    }

    /// Where example `i` came from: `train.parquet row 5`.
    pub fn origin(&self, i: usize) -> String {
        let (file, row) = self.rows.get(i).copied().unwrap_or((0, i));
        let name = self
            .files
            .get(file)
            .and_then(|f| f.file_name())
            .map_or_else(|| "?".into(), |f| f.to_string_lossy().to_string());
        format!("{name} row {row}")
    }
}
