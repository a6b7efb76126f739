//! A BPE tokenizer trained deterministically on the training split, or loaded from a
//! `tokenizer.json`, through the `tokenizers` crate.
//!
//! Why BPE without a continuing-subword prefix rather than WordPiece: the `tokenizers` trainers
//! number the `##`-prefixed symbols in hash-map order, and merge ties are broken by those
//! numbers, so two WordPiece trainings on the same text gave different vocabularies (our
//! determinism test caught it). Without affixes every symbol id comes from the sorted alphabet
//! or from the merge order, and training is reproducible. Sentences are encoded as `[CLS] a [SEP]`,
//! pairs as `[CLS] a [SEP] b [SEP]`, truncated to `max_length` (longest sequence first).

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, EncodeInput, Tokenizer, TruncationParams, TruncationStrategy};

/// Errors about text inputs and tokenizers; input errors name the row.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    #[error("row {row}: empty text")]
    Empty { row: usize },
    #[error("row {row}: label {label} is outside the {count} labels")]
    Label {
        row: usize,
        label: u32,
        count: usize,
    },
    #[error("row {row}: {words} words but {tags} tags")]
    TagCount {
        row: usize,
        words: usize,
        tags: usize,
    },
    #[error("row {row}: tokenizer failed: {message}")]
    Encode { row: usize, message: String },
    #[error("tokenizer {path}: {message}")]
    File { path: String, message: String },
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("the tokenizer has no `{0}` token")]
    MissingSpecial(&'static str),
}

impl TextError {
    /// The example (its position in the split) an input error is about.
    pub fn row(&self) -> Option<usize> {
        match self {
            Self::Empty { row }
            | Self::Label { row, .. }
            | Self::TagCount { row, .. }
            | Self::Encode { row, .. } => Some(*row),
            _ => None,
        }
    }
}

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const CLS: &str = "[CLS]";
pub const SEP: &str = "[SEP]";

/// A tokenizer plus the ids the models need.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub pad_id: u32,
    max_length: usize,
}

/// One encoded instance: token ids (specials included) and, for word inputs, the word index of
/// each token (`None` for specials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub word_ids: Vec<Option<u32>>,
}

impl TextTokenizer {
    /// Train a BPE vocabulary on `texts` (words pre-split as BERT does, lower-cased when asked).
    /// Deterministic: the same texts give the same vocabulary (checked by a test).
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        lowercase: bool,
        max_length: usize,
    ) -> Result<Self, TextError> {
        let specials: Vec<AddedToken> = [PAD, UNK, CLS, SEP, "[MASK]"]
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .build()
            .into();
        let model = BPE::builder()
            .unk_token(UNK.into())
            .build()
            .map_err(|e| TextError::Train(e.to_string()))?;
        let mut tk = Tokenizer::new(model);
        tk.with_normalizer(Some(BertNormalizer::new(
            true,
            true,
            Some(lowercase),
            lowercase,
        )))
        .map_err(|e| TextError::Train(e.to_string()))?;
        tk.with_pre_tokenizer(Some(BertPreTokenizer));
        tk.train(&mut trainer, texts)
            .map_err(|e| TextError::Train(e.to_string()))?;
        Self::finish(tk, max_length)
    }

    /// Load a `tokenizer.json` (from the hub or a local folder). It must have `[PAD]`-like
    /// padding and `[CLS]`/`[SEP]` (or `<s>`/`</s>`) specials.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, TextError> {
        let tk = Tokenizer::from_file(path).map_err(|e| TextError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::finish(tk, max_length)
    }

    fn finish(mut tk: Tokenizer, max_length: usize) -> Result<Self, TextError> {
        let find = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|n| tk.token_to_id(n).map(|id| (*n, id)))
        };
        let (pad_name, pad_id) = find(&[PAD, "<pad>"]).ok_or(TextError::MissingSpecial(PAD))?;
        let (cls, cls_id) = find(&[CLS, "<s>"]).ok_or(TextError::MissingSpecial(CLS))?;
        let (sep, sep_id) = find(&[SEP, "</s>"]).ok_or(TextError::MissingSpecial(SEP))?;
        let _ = pad_name;
        let post = TemplateProcessing::builder()
            .try_single(format!("{cls} $A {sep}"))
            .and_then(|b| b.try_pair(format!("{cls} $A {sep} $B:1 {sep}:1")))
            .map_err(|e| TextError::Train(e.to_string()))?
            .special_tokens(vec![(cls, cls_id), (sep, sep_id)])
            .build()
            .map_err(|e| TextError::Train(e.to_string()))?;
        tk.with_post_processor(Some(post));
        tk.with_truncation(Some(TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        }))
        .map_err(|e| TextError::Train(e.to_string()))?;
        tk.with_padding(None);
        Ok(Self {
            inner: tk,
            pad_id,
            max_length,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), TextError> {
        self.inner.save(path, false).map_err(|e| TextError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The tokenizer as `tokenizer.json` text (a served model's folder carries it).
    pub fn to_json(&self) -> Result<String, TextError> {
        self.inner
            .to_string(false)
            .map_err(|e| TextError::Train(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The token strings of the vocabulary, by id (for tests and inspection).
    pub fn vocab(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        v.sort_by_key(|(_, id)| *id);
        v
    }

    /// Encode a sentence or a sentence pair; an empty (or all-whitespace) text is an error.
    pub fn encode(&self, text: &str, pair: Option<&str>, row: usize) -> Result<Encoded, TextError> {
        if text.trim().is_empty() || pair.is_some_and(|p| p.trim().is_empty()) {
            return Err(TextError::Empty { row });
        }
        let input = match pair {
            Some(p) => EncodeInput::Dual(text.into(), p.into()),
            None => EncodeInput::Single(text.into()),
        };
        let enc = self
            .inner
            .encode(input, true)
            .map_err(|e| TextError::Encode {
                row,
                message: e.to_string(),
            })?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
        })
    }

    /// Encode pre-split words (token classification); `word_ids` maps tokens back to words.
    pub fn encode_words(&self, words: &[String], row: usize) -> Result<Encoded, TextError> {
        if words.is_empty() || words.iter().all(|w| w.trim().is_empty()) {
            return Err(TextError::Empty { row });
        }
        let enc = self
            .inner
            .encode(EncodeInput::Single(words.into()), true)
            .map_err(|e| TextError::Encode {
                row,
                message: e.to_string(),
            })?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: [&str; 6] = [
        "the film is a quiet triumph",
        "a dull , lifeless film",
        "the actors are wonderful and the film is wonderful",
        "lifeless and dull from start to finish",
        "a triumph of quiet acting",
        "the finish is wonderful",
    ];

    fn trained(max_length: usize) -> TextTokenizer {
        TextTokenizer::train(CORPUS.iter().copied(), 60, true, max_length).expect("train")
    }

    #[test]
    fn training_is_deterministic() {
        let a = trained(16).vocab();
        for _ in 0..3 {
            assert_eq!(trained(16).vocab(), a);
        }
        assert_eq!(
            &a[..4],
            &[
                (PAD.to_string(), 0),
                (UNK.to_string(), 1),
                (CLS.to_string(), 2),
                (SEP.to_string(), 3)
            ]
        );
    }

    #[test]
    fn pairs_get_a_separator_and_truncation_keeps_the_specials() -> Result<(), TextError> {
        let tk = trained(8);
        let e = tk.encode("the film", Some("a triumph"), 0)?;
        assert_eq!(e.ids[0], 2);
        assert_eq!(e.ids.iter().filter(|i| **i == 3).count(), 2, "{:?}", e.ids);
        let long = tk.encode(
            "the film is a quiet triumph of quiet acting and the finish",
            None,
            0,
        )?;
        assert_eq!(long.ids.len(), 8);
        assert_eq!((long.ids[0], long.ids[7]), (2, 3));
        let pair = tk.encode("the film is a quiet triumph of acting", Some("dull"), 0)?;
        assert_eq!(pair.ids.len(), 8);
        assert_eq!(pair.ids.iter().filter(|i| **i == 3).count(), 2);
        Ok(())
    }

    #[test]
    fn words_map_back_and_empty_input_names_the_row() -> Result<(), TextError> {
        let tk = trained(16);
        let words: Vec<String> = ["wonderful", "film"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = tk.encode_words(&words, 0)?;
        assert_eq!(e.word_ids.first(), Some(&None));
        assert!(e.word_ids.contains(&Some(1)));
        let err = tk
            .encode("   ", None, 7)
            .expect_err("empty accepted")
            .to_string();
        assert_eq!(err, "row 7: empty text");
        Ok(())
    }
}
