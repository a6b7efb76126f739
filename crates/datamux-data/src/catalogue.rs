//! The dataset catalogue: which datasets exist, their kind, columns, labels and locations.
//! The built-in catalogue is `catalogue.toml` beside this crate, compiled in; a `catalogue.toml`
//! in the data directory is read at run time and merged over it (an entry of the same name
//! replaces the built-in one), so a dataset is added without rebuilding the binary.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::DataError;

/// The default catalogue, compiled into the binary.
pub const DEFAULT: &str = include_str!("../catalogue.toml");

/// The name of the catalogue file read from the data directory at run time.
pub const FILE: &str = "catalogue.toml";

/// What one example of a dataset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Encoded image bytes (PNG/JPEG) and a class label.
    ImageClassification,
    /// A sentence (or sentence pair) and a class label.
    TextClassification,
    /// Pre-split words with one BIO tag id each.
    TokenClassification,
    /// Raw text lines with no labels (the retrieval warm-up corpus).
    TextCorpus,
    /// A sequence of fixed-width feature frames (`list<fixed_size_list<float>>`, such as MFCCs)
    /// and a class label.
    FrameClassification,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::ImageClassification => "image_classification",
            Self::TextClassification => "text_classification",
            Self::TokenClassification => "token_classification",
            Self::TextCorpus => "text_corpus",
            Self::FrameClassification => "frame_classification",
        }
    }
}

/// Column names, by role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    pub image: Option<String>,
    pub text: Option<String>,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    pub tokens: Option<String>,
    pub tags: Option<String>,
    pub frames: Option<String>,
}

/// Where a dataset lives in the local mirror: `<data dir>/<folder>/<file>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Local {
    pub folder: String,
    pub files: BTreeMap<String, Vec<String>>,
}

/// Where a dataset lives on the Hugging Face hub.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hub {
    pub repo: String,
    pub revision: String,
    pub files: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    pub name: String,
    pub kind: Kind,
    pub columns: Columns,
    #[serde(default)]
    pub labels: Vec<String>,
    pub labels_file: Option<String>,
    pub local: Option<Local>,
    pub hub: Option<Hub>,
}

impl DatasetEntry {
    /// Splits offered by any location, sorted.
    pub fn splits(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .local
            .iter()
            .flat_map(|l| l.files.keys())
            .chain(self.hub.iter().flat_map(|h| h.files.keys()))
            .cloned()
            .collect();
        s.sort();
        s.dedup();
        s
    }

    pub fn has_split(&self, split: &str) -> bool {
        self.splits().iter().any(|s| s == split)
    }

    fn validate(&self) -> Result<(), String> {
        let c = &self.columns;
        let needed: &[(&str, &Option<String>)] = match self.kind {
            Kind::ImageClassification => &[("image", &c.image), ("label", &c.label)],
            Kind::TextClassification => &[("text", &c.text), ("label", &c.label)],
            Kind::TokenClassification => &[("tokens", &c.tokens), ("tags", &c.tags)],
            Kind::TextCorpus => &[("text", &c.text)],
            Kind::FrameClassification => &[("frames", &c.frames), ("label", &c.label)],
        };
        for (role, col) in needed {
            if col.is_none() {
                return Err(format!(
                    "dataset `{}` ({}) needs a `{role}` column",
                    self.name,
                    self.kind.name()
                ));
            }
        }
        if self.local.is_none() && self.hub.is_none() {
            return Err(format!(
                "dataset `{}` has neither a `local` nor a `hub` location",
                self.name
            ));
        }
        let labelled = self.kind != Kind::TextCorpus;
        if labelled && self.labels.is_empty() && self.labels_file.is_none() {
            return Err(format!(
                "dataset `{}` needs `labels` or `labels_file`",
                self.name
            ));
        }
        if self.labels_file.is_some() && self.local.is_none() {
            return Err(format!(
                "dataset `{}`: `labels_file` is read from the local folder, which is not set",
                self.name
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCatalogue {
    dataset: Vec<DatasetEntry>,
}

/// A parsed, validated catalogue.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub datasets: Vec<DatasetEntry>,
    /// The run-time catalogue file merged over the built-in one, if any (for error messages).
    pub file: Option<std::path::PathBuf>,
}

impl Catalogue {
    /// The compiled-in default catalogue.
    pub fn builtin() -> Result<Self, DataError> {
        Self::parse(DEFAULT, "catalogue.toml (built in)")
    }

    /// The built-in catalogue with `<data_dir>/catalogue.toml` merged over it when that file
    /// exists: its entries replace built-in ones of the same name and add the rest.
    pub fn load(data_dir: Option<&Path>) -> Result<Self, DataError> {
        let mut cat = Self::builtin()?;
        let Some(path) = data_dir.map(|d| d.join(FILE)).filter(|p| p.is_file()) else {
            return Ok(cat);
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Catalogue {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        for entry in Self::parse(&text, &origin)?.datasets {
            match cat.datasets.iter_mut().find(|d| d.name == entry.name) {
                Some(d) => *d = entry,
                None => cat.datasets.push(entry),
            }
        }
        cat.file = Some(path);
        Ok(cat)
    }

    /// Parse and validate TOML; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DataError> {
        let err = |message: String| DataError::Catalogue {
            origin: origin.to_string(),
            message,
        };
        let wire: WireCatalogue = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for d in &wire.dataset {
            d.validate().map_err(err)?;
            if !seen.insert(d.name.clone()) {
                return Err(err(format!("dataset `{}` is listed twice", d.name)));
            }
        }
        Ok(Self {
            datasets: wire.dataset,
            file: None,
        })
    }

    pub fn get(&self, name: &str) -> Result<&DatasetEntry, DataError> {
        self.datasets
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| DataError::UnknownDataset {
                name: name.to_string(),
                known: self.datasets.iter().map(|d| d.name.clone()).collect(),
                file: self.file.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_parses_and_has_the_issue_entries() -> Result<(), DataError> {
        let c = Catalogue::builtin()?;
        for name in [
            "mnist",
            "fashion_mnist",
            "cifar10",
            "sst2",
            "mnli",
            "qnli",
            "qqp",
            "rotten_tomatoes",
            "conll2003",
            "wikitext-103",
            "rt-snippets",
            "wnut16",
        ] {
            c.get(name)?;
        }
        assert_eq!(
            c.get("mnist")?.hub.as_ref().map(|h| h.repo.as_str()),
            Some("ylecun/mnist")
        );
        assert!(c.get("mnist")?.local.is_some());
        assert_eq!(
            c.get("cifar10_sample")?
                .local
                .as_ref()
                .map(|l| l.folder.as_str()),
            Some("cifar10-sample")
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_and_incomplete_entries_are_rejected() {
        let typo = r#"
            [[dataset]]
            name = "x"
            kind = "text_classification"
            columns = { text = "t", lable = "l" }
            labels = ["a"]
            local = { folder = "x", files = { train = ["t.parquet"] } }
        "#;
        let e = Catalogue::parse(typo, "test")
            .expect_err("typo accepted")
            .to_string();
        assert!(e.contains("lable"), "{e}");
        let no_label = typo.replace("lable", "text_pair");
        let e = Catalogue::parse(&no_label, "test")
            .expect_err("missing label accepted")
            .to_string();
        assert!(e.contains("`label` column"), "{e}");
    }

    #[test]
    fn unknown_dataset_lists_the_known_ones() -> Result<(), DataError> {
        let e = Catalogue::builtin()?
            .get("imagenet")
            .expect_err("found imagenet")
            .to_string();
        assert!(
            e.contains("unknown dataset `imagenet`") && e.contains("mnist"),
            "{e}"
        );
        // It says how to add one without rebuilding.
        assert!(
            e.contains("catalogue.toml") && e.contains("[[dataset]]"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn a_catalogue_file_in_the_data_directory_adds_and_replaces_entries() -> Result<(), DataError> {
        let dir = tempfile::tempdir().map_err(|e| DataError::Catalogue {
            origin: "tempdir".into(),
            message: e.to_string(),
        })?;
        let file = r#"
            [[dataset]]
            name = "digits-copy"
            kind = "image_classification"
            columns = { image = "image", label = "label" }
            labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
            local = { folder = "mnist", files = { test = ["test.parquet"] } }

            [[dataset]]
            name = "mnist"
            kind = "image_classification"
            columns = { image = "image", label = "label" }
            labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
            local = { folder = "my-mnist", files = { test = ["test.parquet"] } }
        "#;
        let builtin = Catalogue::builtin()?;
        assert_eq!(
            Catalogue::load(Some(dir.path()))?.datasets,
            builtin.datasets
        );
        std::fs::write(dir.path().join(FILE), file).map_err(|e| DataError::Catalogue {
            origin: "write".into(),
            message: e.to_string(),
        })?;
        let cat = Catalogue::load(Some(dir.path()))?;
        assert_eq!(cat.datasets.len(), builtin.datasets.len() + 1);
        assert!(cat.get("digits-copy").is_ok());
        let mnist = cat.get("mnist")?;
        assert_eq!(
            mnist.local.as_ref().map(|l| l.folder.as_str()),
            Some("my-mnist")
        );
        assert!(
            mnist.hub.is_none(),
            "the file's entry replaces the built-in one whole"
        );
        // An unknown dataset names the file that was read.
        let e = cat
            .get("nope")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(&dir.path().join(FILE).display().to_string()),
            "{e}"
        );
        // A broken file is an error naming it, never ignored.
        std::fs::write(dir.path().join(FILE), "[[dataset]]\nname = 3\n").map_err(|e| {
            DataError::Catalogue {
                origin: "write".into(),
                message: e.to_string(),
            }
        })?;
        let e = Catalogue::load(Some(dir.path()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(FILE), "{e}");
        Ok(())
    }
}
