//! Sentence, sentence-pair and token classification as one core `Task`, with the retrieval head
//! of the DataMUX warm-up. `(α_task, α_ret) = (0, 1)` is the warm-up, `(0.9, 0.1)` fine-tuning,
//! `(1, 0)` a plain classifier (method.md §5).
//!
//! Reference: `princeton-nlp/DataMUX`, `models/multiplexing.py`, the sentence and token muxed
//! models, whose shared pipeline lives in the core `MuxNet` here; only the heads differ.

use candle_core::{D, DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use datamux_core::SeededVarMap;
use datamux_core::demux::Positions;
use datamux_core::heads::{self, EmbeddingHead, SequenceHead, TokenHead};
use datamux_core::model::{self, MuxNet};
use datamux_core::retrieval::{RetrievalHead, RetrievalTargets};
use datamux_core::task::{self, Losses, Score, Task};

use crate::config::{Config, SentenceReadout};
use crate::frontend::{TextBackbone, TextFrontend, TextInput};
use crate::metrics;
use crate::pretrained::Pretrained;

pub use crate::data::{IGNORE, SentenceData, TextData, TokenData};

/// A device-ready batch.
pub struct TextBatch {
    pub input: TextInput,
    /// Sentence labels `(B·N)`, or token labels `(B·N·L)` with [`IGNORE`].
    pub labels: Vec<u32>,
    pub real: Vec<bool>,
    /// Token tasks: the word index of each labelled position `(B·N·L)`, [`IGNORE`] elsewhere,
    /// and the gold word tags of each slot (empty for dummies), for entity F1.
    pub words: Vec<u32>,
    pub gold_tags: Vec<Vec<u32>>,
    /// Embedding tasks: the target of each slot `(B·N, D)`, zeros for dummies.
    pub embeddings: Option<Tensor>,
    pub targets: RetrievalTargets,
    pub len: usize,
}

#[derive(Clone, Debug)]
enum Head {
    Sentence(SequenceHead),
    Token(TokenHead),
    Embedding(EmbeddingHead),
}

/// Which head a text task has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    Sentence,
    Token,
    /// Multiplexed sentence embeddings (`crate::embeddings`).
    Embedding,
}

impl HeadKind {
    /// Whether the head reads one position per instance (the sentence readout).
    pub fn is_sequence(&self) -> bool {
        matches!(self, Self::Sentence | Self::Embedding)
    }
}

pub struct TextTask {
    pub net: MuxNet<TextFrontend, TextBackbone>,
    head: Head,
    retrieval: RetrievalHead,
    /// `(α_task, α_ret)`.
    pub weights: (f64, f64),
    /// Pad every batch to this length (the speed protocol's fixed 128) instead of its longest.
    pub fixed_len: Option<usize>,
    /// Share of retrieval targets kept per batch (`retrieval_fraction` of the config).
    pub retrieval_fraction: f64,
    readout: SentenceReadout,
    /// `embedding_weight`: the distillation head and the term's weight (sentence tasks).
    distill: Option<(EmbeddingHead, f64)>,
    /// With a pretrained checkpoint, the learning rate scale of what it does not provide.
    fresh_lr_scale: Option<f64>,
    label_names: Vec<String>,
    pad_id: u32,
    n: usize,
    device: Device,
}

impl TextTask {
    /// Parameters under `frontend.*`, `backbone.*`, `mux.*`, `demux.*`, `head.*` and
    /// `retrieval.*` of `map`. With `pretrained`, the frontend and backbone take its sizes and
    /// are loaded from it (the vocabulary is the checkpoint's, `vocab` is checked against it);
    /// every other variable is new.
    pub fn new(
        cfg: &Config,
        mux: &model::Config,
        head: HeadKind,
        label_names: &[String],
        vocab: usize,
        pad_id: u32,
        weights: (f64, f64),
        map: &SeededVarMap,
        device: &Device,
        pretrained: Option<&Pretrained>,
    ) -> Result<Self> {
        cfg.validate(mux.n_instances, mux.demux.kind)
            .map_err(candle_core::Error::Msg)?;
        let vb = map.var_builder(DType::F32, device);
        let (enc, v) = match pretrained {
            Some(p) => {
                let pc = &p.config;
                if vocab > pc.vocab_size {
                    candle_core::bail!(
                        "model `{}`: the tokenizer has {vocab} tokens, the checkpoint's vocabulary {}",
                        p.repo,
                        pc.vocab_size
                    );
                }
                if cfg.max_length > pc.max_position_embeddings {
                    candle_core::bail!(
                        "max_length {} exceeds the {} positions of `{}`",
                        cfg.max_length,
                        pc.max_position_embeddings,
                        p.repo
                    );
                }
                (p.encoder_config(&cfg.encoder()), pc.vocab_size)
            }
            None => (cfg.encoder(), vocab),
        };
        let d = enc.hidden_size;
        let frontend = TextFrontend::new(
            v,
            cfg.max_length,
            d,
            cfg.embedding_norm || pretrained.is_some(), // BERT's embedding LayerNorm
            cfg.embedding_dropout,
            enc.layer_norm_eps,
            vb.pp("frontend"),
        )?;
        let frontend = match pretrained {
            Some(p) => frontend.with_token_types(p.config.type_vocab_size, vb.pp("frontend"))?,
            None => frontend,
        };
        let backbone = TextBackbone::new(&enc, cfg.mux_norm, vb.pp("backbone"))?;
        let net = MuxNet::new(mux, frontend, backbone, map.seed(), vb.clone())?;
        let classes = label_names.len();
        let head = match head {
            HeadKind::Sentence => Head::Sentence(SequenceHead::new(d, classes, vb.pp("head"))?),
            HeadKind::Token => Head::Token(TokenHead::new(d, classes, vb.pp("head"))?),
            HeadKind::Embedding => Head::Embedding(EmbeddingHead::new(d, vb.pp("head"))?),
        };
        let distill = match &head {
            Head::Sentence(_) if cfg.embedding_weight > 0.0 => Some((
                EmbeddingHead::new(d, vb.pp("head").pp("distill"))?,
                cfg.embedding_weight,
            )),
            _ => None,
        };
        let retrieval = RetrievalHead::new(&mux.demux, mux.n_instances, d, v, vb.pp("retrieval"))?;
        if let Some(p) = pretrained {
            p.load_into(map).map_err(candle_core::Error::wrap)?;
        }
        Ok(Self {
            net,
            head,
            retrieval,
            weights,
            fixed_len: None,
            retrieval_fraction: cfg.retrieval_fraction,
            readout: cfg.sentence_readout,
            distill,
            fresh_lr_scale: pretrained.map(|_| cfg.fresh_lr_scale),
            label_names: label_names.to_vec(),
            pad_id,
            n: mux.n_instances,
            device: device.clone(),
        })
    }

    /// The head alone on demultiplexed `(B, N, L', D)`: `(B·N, C)` or `(B·N, L, C)`.
    pub fn head_logits(&self, z: &Tensor) -> Result<Tensor> {
        match &self.head {
            Head::Sentence(h) => h.forward(z),
            Head::Token(h) => h.forward(z),
            Head::Embedding(h) => h.forward(z),
        }
    }

    /// Task logits: `(B·N, C)` for sentences, `(B·N, L, C)` for tokens, `(B·N, D)` embeddings.
    fn logits(
        &self,
        batch: &TextBatch,
        train: bool,
        tokens: bool,
    ) -> Result<(datamux_core::Encoded, Tensor)> {
        let (enc, z) = self.represent(batch, train, tokens)?;
        Ok((enc, self.head_logits(&z)?))
    }

    /// What the head reads: the demultiplexed positions `(B, N, L, D)` for tokens, else the
    /// sentence readout `(B, N, 1, D)`. Without `tokens` (no retrieval head reads the
    /// encoding), a summary readout encodes only the prefix.
    fn represent(
        &self,
        batch: &TextBatch,
        train: bool,
        tokens: bool,
    ) -> Result<(datamux_core::Encoded, Tensor)> {
        if let Head::Token(_) = &self.head {
            return self.net.forward_t(&batch.input, Positions::Tokens, train);
        }
        let (enc, z) = match self.readout {
            SentenceReadout::Summary if !tokens => self.net.forward_summary(&batch.input, train)?,
            SentenceReadout::Summary => {
                self.net
                    .forward_t(&batch.input, Positions::Summary, train)?
            }
            SentenceReadout::Mean => {
                let (enc, z) = self.net.forward_t(&batch.input, Positions::Tokens, train)?;
                (enc, heads::masked_mean(&z, &batch.input.pad)?)
            }
        };
        Ok((enc, z))
    }

    /// The distillation term on a readout `(B, N, 1, D)` (`embedding_weight`), unweighted.
    fn distill_loss(&self, head: &EmbeddingHead, z: &Tensor, batch: &TextBatch) -> Result<Tensor> {
        let target = batch.embeddings.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("embedding_weight > 0 but the batch has no targets".into())
        })?;
        task::real_cosine_loss(&head.forward(z)?, target, &batch.real)
    }

    fn task_loss(&self, logits: &Tensor, batch: &TextBatch) -> Result<Tensor> {
        match &self.head {
            Head::Sentence(_) => task::real_cross_entropy(logits, &batch.labels, &batch.real),
            Head::Token(_) => {
                // (B·N, L, C) -> (B·N·L, C); labelled positions of real instances only.
                let c = logits.dim(D::Minus1)?;
                let flat = logits.reshape(((), c))?;
                let keep: Vec<bool> = batch.labels.iter().map(|l| *l != IGNORE).collect();
                if !keep.iter().any(|k| *k) {
                    return Tensor::zeros((), DType::F32, &self.device);
                }
                task::real_cross_entropy(&flat, &batch.labels, &keep)
            }
            Head::Embedding(_) => {
                let target = batch.embeddings.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("an embedding batch without targets".into())
                })?;
                task::real_cosine_loss(logits, target, &batch.real)
            }
        }
    }
}

impl Task for TextTask {
    type Data = TextData;
    type Batch = TextBatch;

    fn n_instances(&self) -> usize {
        self.n
    }

    fn len(&self, data: &TextData) -> usize {
        data.len()
    }

    fn example_len(&self, data: &TextData, i: usize) -> usize {
        data.ids(i).len()
    }

    /// Dummy slots are all padding: they add nothing to the mix and carry no labels.
    fn batch(
        &self,
        data: &TextData,
        slots: &[Option<usize>],
        rng: &mut ChaCha8Rng,
    ) -> Result<TextBatch> {
        let n = self.n;
        let b = slots.len() / n;
        let longest = slots
            .iter()
            .flatten()
            .map(|i| data.ids(*i).len())
            .max()
            .unwrap_or(1);
        let l = self.fixed_len.unwrap_or(longest).max(1);
        let mut ids = Vec::with_capacity(slots.len() * l);
        let mut pad = Vec::with_capacity(slots.len() * l);
        let mut labels = Vec::new();
        let mut words = Vec::new();
        let mut gold_tags = Vec::new();
        let mut embeddings = Vec::new();
        for slot in slots {
            let seq: &[u32] = slot.map(|i| data.ids(i)).unwrap_or_default();
            let seq = &seq[..seq.len().min(l)];
            ids.extend(seq);
            ids.extend(std::iter::repeat_n(self.pad_id, l - seq.len()));
            pad.extend((0..l).map(|j| j >= seq.len()));
            match data {
                TextData::Sentences(s) | TextData::Embeddings(s) => {
                    labels.push(slot.map_or(0, |i| s.labels[i]));
                    if let Some(d) = s.targets.first().map(Vec::len) {
                        match slot {
                            Some(i) => embeddings.extend(&s.targets[*i]),
                            None => embeddings.extend(std::iter::repeat_n(0f32, d)),
                        }
                    }
                }
                TextData::Tokens(t) => {
                    let tl: &[u32] = slot
                        .map(|i| t.token_labels[i].as_slice())
                        .unwrap_or_default();
                    let tw: &[u32] = slot
                        .map(|i| t.token_words[i].as_slice())
                        .unwrap_or_default();
                    labels.extend((0..l).map(|j| tl.get(j).copied().unwrap_or(IGNORE)));
                    words.extend((0..l).map(|j| tw.get(j).copied().unwrap_or(IGNORE)));
                    gold_tags.push(slot.map(|i| t.word_tags[i].clone()).unwrap_or_default());
                }
            }
        }
        let embeddings = if embeddings.is_empty() {
            None
        } else {
            let (rows, d) = (slots.len(), embeddings.len() / slots.len());
            Some(Tensor::from_vec(embeddings, (rows, d), &self.device)?) // (B·N, D)
        };
        let real = datamux_core::group::real_mask(slots);
        let targets = RetrievalTargets::sample(
            &ids,
            &pad,
            &real,
            (b, n, l),
            self.net.prefix_len(),
            self.retrieval_fraction,
            rng,
        );
        let pad_u8: Vec<u8> = pad.iter().map(|p| u8::from(*p)).collect();
        Ok(TextBatch {
            input: TextInput {
                ids: Tensor::from_vec(ids, (b, n, l), &self.device)?,
                pad: Tensor::from_vec(pad_u8, (b, n, l), &self.device)?,
            },
            labels,
            real,
            words,
            gold_tags,
            embeddings,
            targets,
            len: l,
        })
    }

    fn loss(&self, batch: &TextBatch, train: bool) -> Result<Losses> {
        self.loss_soft(batch, train, None)
    }

    fn loss_distilled(
        &self,
        batch: &TextBatch,
        teacher: &Tensor,
        soft: task::Soft,
        train: bool,
    ) -> Result<Losses> {
        if !matches!(self.head, Head::Sentence(_)) {
            candle_core::bail!("train.distill: soft targets are for sentence classification");
        }
        self.loss_soft(batch, train, Some((teacher, soft)))
    }

    fn score(&self, batch: &TextBatch) -> Result<Score> {
        let (enc, z) = self.represent(batch, false, !batch.targets.is_empty())?;
        let logits = self.head_logits(&z)?;
        let mut score = match &self.head {
            Head::Sentence(_) => task::slot_counts(&logits, &batch.labels, &batch.real, self.n)?,
            Head::Token(_) => self.token_score(&logits, batch)?,
            Head::Embedding(_) => match &batch.embeddings {
                Some(t) => task::embedding_pairs(&logits, t, &batch.real, self.n)?,
                None => candle_core::bail!("an embedding batch without targets"),
            },
        };
        // With the distillation term, how close each instance stays to its N = 1 embedding.
        if let (Some((h, _)), Some(t)) = (&self.distill, &batch.embeddings) {
            let pairs = task::embedding_pairs(&h.forward(&z)?, t, &batch.real, self.n)?;
            score.embeddings = pairs.embeddings;
        }
        let r = self
            .retrieval
            .forward_t(&enc.hidden, &batch.targets, false)?;
        score.retrieval_correct = r.correct;
        score.retrieval_total = r.total;
        Ok(score)
    }

    fn predict(&self, batch: &TextBatch) -> Result<Tensor> {
        Ok(self.logits(batch, false, false)?.1)
    }

    fn lr_scale(&self, name: &str) -> f64 {
        match self.fresh_lr_scale {
            Some(s) if crate::pretrained::bert_name(name).is_none() => s,
            _ => 1.0,
        }
    }

    fn selection_metric(&self) -> &'static str {
        match self.head {
            Head::Sentence(_) => "accuracy",
            Head::Token(_) => "f1",
            Head::Embedding(_) => "cosine",
        }
    }
}

impl TextTask {
    /// [`Task::loss`], the task term against soft targets too where `soft` is given
    /// (`(teacher logits, weight and temperature)`, sentence classification).
    fn loss_soft(
        &self,
        batch: &TextBatch,
        train: bool,
        soft: Option<(&Tensor, task::Soft)>,
    ) -> Result<Losses> {
        let (a_task, a_ret) = self.weights;
        let (enc, task) = if a_task > 0.0 {
            let (enc, z) = self.represent(batch, train, a_ret > 0.0)?;
            let logits = self.head_logits(&z)?;
            let mut loss = self.task_loss(&logits, batch)?;
            if let Some((teacher, soft)) = soft {
                loss = task::distilled(&loss, &logits, teacher, &batch.real, soft)?;
            }
            if let Some((h, w)) = &self.distill {
                loss = (loss + (self.distill_loss(h, &z, batch)? * *w)?)?;
            }
            (enc, Some(loss))
        } else {
            // The warm-up needs no task head.
            (self.net.encode(&batch.input, train)?, None)
        };
        let retrieval = if a_ret > 0.0 {
            Some(
                self.retrieval
                    .forward_t(&enc.hidden, &batch.targets, train)?
                    .loss,
            )
        } else {
            None
        };
        let mut total = Tensor::zeros((), DType::F32, &self.device)?;
        if let Some(t) = &task {
            total = (total + (t * a_task)?)?;
        }
        if let Some(r) = &retrieval {
            total = (total + (r * a_ret)?)?;
        }
        Ok(Losses {
            total,
            task,
            retrieval,
        })
    }

    /// Token accuracy per slot over labelled positions, and entity-level F1 over words: each
    /// word is predicted at its first sub-token; words cut off by truncation count as `O`.
    fn token_score(&self, logits: &Tensor, batch: &TextBatch) -> Result<Score> {
        let pred = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // (B·N·L)
        let l = batch.len;
        let name = |id: u32| {
            self.label_names
                .get(id as usize)
                .map(String::as_str)
                .unwrap_or("O")
        };
        let mut score = Score::with_slots(self.n);
        let mut spans = [0u64; 3];
        for row in 0..batch.real.len() {
            if !batch.real[row] {
                continue;
            }
            score.examples += 1;
            let gold = &batch.gold_tags[row];
            let mut predicted = vec!["O"; gold.len()];
            for j in 0..l {
                let (label, word) = (batch.labels[row * l + j], batch.words[row * l + j]);
                if label == IGNORE {
                    continue;
                }
                score.slot_total[row % self.n] += 1;
                score.slot_correct[row % self.n] += u64::from(pred[row * l + j] == label);
                if let Some(p) = predicted.get_mut(word as usize) {
                    *p = name(pred[row * l + j]);
                }
            }
            let gold: Vec<&str> = gold.iter().map(|g| name(*g)).collect();
            let c = metrics::span_counts(&gold, &predicted);
            (0..3).for_each(|k| spans[k] += c[k]);
        }
        score.spans = Some(spans);
        Ok(score)
    }
}
