//! A text task's data in plain Rust: token ids with their sentence labels, word tags, or
//! embedding targets, encoded once per split by the run's tokenizer.

use crate::tokenizer::{TextError, TextTokenizer};

/// Label id of token positions that carry no label (specials, later sub-tokens, padding).
pub const IGNORE: u32 = u32::MAX;

/// Encoded sentences (or pairs) and their labels.
#[derive(Debug, Clone, Default)]
pub struct SentenceData {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    /// The pretrained model's N = 1 embedding of each sentence `(rows, D)`
    /// (`crate::embeddings`): the target of the embedding objective and of `embedding_weight`;
    /// empty when neither is used.
    pub targets: Vec<Vec<f32>>,
}

impl SentenceData {
    pub fn encode(
        tk: &TextTokenizer,
        texts: &[String],
        pairs: Option<&[String]>,
        labels: &[u32],
        num_labels: usize,
    ) -> std::result::Result<Self, TextError> {
        let mut ids = Vec::with_capacity(texts.len());
        for (row, text) in texts.iter().enumerate() {
            let label = labels.get(row).copied().unwrap_or(u32::MAX);
            if label as usize >= num_labels {
                return Err(TextError::Label {
                    row,
                    label,
                    count: num_labels,
                });
            }
            ids.push(
                tk.encode(
                    text,
                    pairs.and_then(|p| p.get(row)).map(String::as_str),
                    row,
                )?
                .ids,
            );
        }
        Ok(Self {
            ids,
            labels: labels.to_vec(),
            targets: Vec::new(),
        })
    }

    /// Unlabelled text (a warm-up corpus): every label is 0 and the task loss weight must be 0.
    pub fn corpus(tk: &TextTokenizer, lines: &[String]) -> std::result::Result<Self, TextError> {
        let ids = lines
            .iter()
            .enumerate()
            .map(|(row, t)| Ok(tk.encode(t, None, row)?.ids))
            .collect::<std::result::Result<Vec<_>, TextError>>()?;
        Ok(Self {
            labels: vec![0; ids.len()],
            ids,
            targets: Vec::new(),
        })
    }
}

/// Encoded word sequences: a label on the first sub-token of each word, and the gold word tags.
#[derive(Debug, Clone, Default)]
pub struct TokenData {
    pub ids: Vec<Vec<u32>>,
    /// Per token: the word's tag on its first sub-token, [`IGNORE`] elsewhere.
    pub token_labels: Vec<Vec<u32>>,
    /// Per token: the word's index on its first sub-token, [`IGNORE`] elsewhere.
    pub token_words: Vec<Vec<u32>>,
    /// Per word, for entity F1; words cut by truncation count as predicted `O`.
    pub word_tags: Vec<Vec<u32>>,
}

impl TokenData {
    pub fn encode(
        tk: &TextTokenizer,
        words: &[Vec<String>],
        tags: &[Vec<u32>],
        num_labels: usize,
    ) -> std::result::Result<Self, TextError> {
        let mut out = Self::default();
        for (row, w) in words.iter().enumerate() {
            let t = tags.get(row).map(Vec::as_slice).unwrap_or_default();
            if t.len() != w.len() {
                return Err(TextError::TagCount {
                    row,
                    words: w.len(),
                    tags: t.len(),
                });
            }
            if let Some(bad) = t.iter().find(|g| **g as usize >= num_labels) {
                return Err(TextError::Label {
                    row,
                    label: *bad,
                    count: num_labels,
                });
            }
            let enc = tk.encode_words(w, row)?;
            let mut prev = None;
            let firsts: Vec<Option<u32>> = enc
                .word_ids
                .iter()
                .map(|wid| {
                    let first = wid.is_some() && *wid != prev;
                    prev = *wid;
                    if first { *wid } else { None }
                })
                .collect();
            out.token_labels.push(
                firsts
                    .iter()
                    .map(|f| f.map_or(IGNORE, |i| t[i as usize]))
                    .collect(),
            );
            out.token_words
                .push(firsts.iter().map(|f| f.unwrap_or(IGNORE)).collect());
            out.ids.push(enc.ids);
            out.word_tags.push(t.to_vec());
        }
        Ok(out)
    }
}

/// The data of a text task.
#[derive(Debug, Clone)]
pub enum TextData {
    Sentences(SentenceData),
    Tokens(TokenData),
    /// Sentences with their `targets` and no labels (the embedding objective).
    Embeddings(SentenceData),
}

impl TextData {
    pub fn len(&self) -> usize {
        match self {
            Self::Sentences(s) => s.ids.len(),
            Self::Tokens(t) => t.ids.len(),
            Self::Embeddings(e) => e.ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn ids(&self, i: usize) -> &[u32] {
        match self {
            Self::Sentences(s) => &s.ids[i],
            Self::Tokens(t) => &t.ids[i],
            Self::Embeddings(e) => &e.ids[i],
        }
    }
}
