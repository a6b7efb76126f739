//! A toy token frontend and task for the core tests: token + position embeddings, the core
//! encoder, a sequence head and the retrieval head. Tiny, odd sizes (D = 12 or 32, L = 7).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use datamux_core::demux::Positions;
use datamux_core::encoder::{self, Encoder};
use datamux_core::heads::SequenceHead;
use datamux_core::layers;
use datamux_core::model::{self, Embedded, Frontend, MuxNet};
use datamux_core::retrieval::{RetrievalHead, RetrievalTargets};
use datamux_core::task::{self, Losses, Score, Task};
use datamux_core::{DemuxKind, MuxKind, SeededVarMap};
use rand_chacha::ChaCha8Rng;

pub const PAD: u32 = 0;

/// `(B, N, L)` token ids -> `(B, N, L, D)`; padding embeds to zero.
pub struct ToyFrontend {
    tokens: Tensor,
    positions: Tensor,
    d: usize,
}

pub struct ToyInput {
    pub ids: Tensor, // (B, N, L) u32
    pub pad: Tensor, // (B, N, L) u8
}

impl ToyFrontend {
    pub fn new(vocab: usize, max_len: usize, d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            tokens: layers::embedding_table(vocab, d, vb.pp("tokens"))?,
            positions: layers::embedding_table(max_len, d, vb.pp("positions"))?,
            d,
        })
    }
}

impl Frontend for ToyFrontend {
    type Input = ToyInput;
    fn embed(&self, input: &ToyInput, _train: bool) -> Result<Embedded> {
        let (b, n, l) = input.ids.dims3()?;
        let e = self
            .tokens
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, n, l, self.d))?;
        let e = e.broadcast_add(&self.positions.narrow(0, 0, l)?)?;
        let keep = (1.0 - input.pad.to_dtype(DType::F32)?)?.unsqueeze(3)?;
        Ok(Embedded {
            xs: e.broadcast_mul(&keep)?,
            pad: Some(input.pad.clone()),
        })
    }
    fn hidden_size(&self) -> usize {
        self.d
    }
}

pub struct ToyTask {
    pub net: MuxNet<ToyFrontend, Encoder>,
    pub head: SequenceHead,
    pub retrieval: RetrievalHead,
    pub n: usize,
    pub weights: (f64, f64),
}

/// Examples: token sequences (0 = padding) and labels.
pub type ToyData = Vec<(Vec<u32>, u32)>;

pub struct ToyBatch {
    pub input: ToyInput,
    pub labels: Vec<u32>,
    pub real: Vec<bool>,
    pub targets: RetrievalTargets,
}

pub struct Sizes {
    pub vocab: usize,
    pub len: usize,
    pub classes: usize,
    pub enc: encoder::Config,
}

impl Sizes {
    pub fn tiny() -> Self {
        Self {
            vocab: 23,
            len: 7,
            classes: 3,
            enc: encoder::Config::tiny(),
        }
    }
}

pub fn toy_task(
    map: &SeededVarMap,
    sizes: &Sizes,
    cfg: &model::Config,
    weights: (f64, f64),
) -> Result<ToyTask> {
    let vb = map.var_builder(DType::F32, &Device::Cpu);
    let d = sizes.enc.hidden_size;
    let frontend = ToyFrontend::new(
        sizes.vocab,
        sizes.len + cfg.n_instances + 1,
        d,
        vb.pp("frontend"),
    )?;
    let backbone = Encoder::new(&sizes.enc, vb.pp("backbone"))?;
    let net = MuxNet::new(cfg, frontend, backbone, map.seed(), vb.clone())?;
    let head = SequenceHead::new(d, sizes.classes, vb.pp("head"))?;
    let retrieval = RetrievalHead::new(
        &cfg.demux,
        cfg.n_instances,
        d,
        sizes.vocab,
        vb.pp("retrieval"),
    )?;
    Ok(ToyTask {
        net,
        head,
        retrieval,
        n: cfg.n_instances,
        weights,
    })
}

pub fn config(n: usize, mux: MuxKind, demux: DemuxKind) -> model::Config {
    let mut cfg = model::Config::new(n, mux, demux);
    cfg.mux.norm = 1.0;
    cfg.demux.dropout = 0.0;
    cfg
}

impl Task for ToyTask {
    type Data = ToyData;
    type Batch = ToyBatch;

    fn n_instances(&self) -> usize {
        self.n
    }
    fn len(&self, data: &ToyData) -> usize {
        data.len()
    }
    fn batch(
        &self,
        data: &ToyData,
        slots: &[Option<usize>],
        rng: &mut ChaCha8Rng,
    ) -> Result<ToyBatch> {
        let l = data[0].0.len();
        let (n, b) = (self.n, slots.len() / self.n);
        let mut ids = Vec::with_capacity(slots.len() * l);
        let mut labels = Vec::with_capacity(slots.len());
        for s in slots {
            match s {
                Some(i) => {
                    ids.extend(&data[*i].0);
                    labels.push(data[*i].1);
                }
                None => {
                    ids.extend(std::iter::repeat_n(PAD, l));
                    labels.push(0);
                }
            }
        }
        let pad: Vec<bool> = ids.iter().map(|t| *t == PAD).collect();
        let real = datamux_core::group::real_mask(slots);
        let targets = RetrievalTargets::sample(
            &ids,
            &pad,
            &real,
            (b, n, l),
            self.net.prefix_len(),
            1.0,
            rng,
        );
        let pad_u8: Vec<u8> = pad.iter().map(|p| u8::from(*p)).collect();
        let dev = Device::Cpu;
        Ok(ToyBatch {
            input: ToyInput {
                ids: Tensor::from_vec(ids, (b, n, l), &dev)?,
                pad: Tensor::from_vec(pad_u8, (b, n, l), &dev)?,
            },
            labels,
            real,
            targets,
        })
    }
    fn loss(&self, batch: &ToyBatch, train: bool) -> Result<Losses> {
        let (enc, z) = self
            .net
            .forward_t(&batch.input, Positions::Summary, train)?;
        let logits = self.head.forward(&z)?;
        let task = task::real_cross_entropy(&logits, &batch.labels, &batch.real)?;
        let ret = self
            .retrieval
            .forward_t(&enc.hidden, &batch.targets, train)?
            .loss;
        let total = ((&task * self.weights.0)? + (&ret * self.weights.1)?)?;
        Ok(Losses {
            total,
            task: Some(task),
            retrieval: Some(ret),
        })
    }
    fn score(&self, batch: &ToyBatch) -> Result<Score> {
        let (enc, z) = self
            .net
            .forward_t(&batch.input, Positions::Summary, false)?;
        let logits = self.head.forward(&z)?;
        let mut score = task::slot_counts(&logits, &batch.labels, &batch.real, self.n)?;
        let r = self
            .retrieval
            .forward_t(&enc.hidden, &batch.targets, false)?;
        score.retrieval_correct = r.correct;
        score.retrieval_total = r.total;
        Ok(score)
    }
    fn predict(&self, batch: &ToyBatch) -> Result<Tensor> {
        let (_, z) = self
            .net
            .forward_t(&batch.input, Positions::Summary, false)?;
        self.head.forward(&z)
    }
}

/// Random sequences of non-padding tokens with the given number of trailing pads; the label is
/// the first token modulo the number of classes.
pub fn toy_data(count: usize, sizes: &Sizes, seed: u64) -> ToyData {
    use rand::Rng;
    let mut rng = datamux_core::init::rng_for(seed, "toy.data");
    (0..count)
        .map(|_| {
            let pads = rng.random_range(0..3);
            let toks: Vec<u32> = (0..sizes.len)
                .map(|j| {
                    if j + pads >= sizes.len {
                        PAD
                    } else {
                        rng.random_range(1..sizes.vocab as u32)
                    }
                })
                .collect();
            let label = toks[0] % sizes.classes as u32;
            (toks, label)
        })
        .collect()
}

/// AdamW over the sorted trainable variables.
pub fn optimizer(map: &SeededVarMap, lr: f64) -> Result<datamux_core::optim::AdamW> {
    use candle_nn::Optimizer;
    let vars = map.sorted_vars()?.into_iter().map(|(_, v)| v).collect();
    datamux_core::optim::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}
