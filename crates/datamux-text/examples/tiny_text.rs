//! A tiny multiplexed text model on synthetic sentences, N = 2: a retrieval warm-up (every
//! position must give back the token of a randomly drawn instance), then classification of
//! whether a sentence contains the word `good`. Runs in seconds:
//!
//!     cargo run --release -p datamux-text --example tiny_text

use candle_core::{Device, Result};
use candle_nn::{Optimizer, ParamsAdamW};
use datamux_core::group::TrainStream;
use datamux_core::init::rng_for;
use datamux_core::optim::AdamW;
use datamux_core::{DemuxKind, Groups, MuxKind, Score, SeededVarMap, Task, model};
use datamux_text::task::{HeadKind, SentenceData, TextData, TextTask};
use datamux_text::{Config, TextTokenizer};
use rand::Rng;

const WORDS: [&str; 12] = [
    "the", "film", "plot", "cast", "is", "was", "very", "quite", "dull", "slow", "long", "good",
];

fn sentences(count: usize, seed: u64) -> (Vec<String>, Vec<u32>) {
    let mut rng = rng_for(seed, "example.text");
    (0..count)
        .map(|_| {
            let words: Vec<&str> = (0..rng.random_range(4..9))
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            let label = u32::from(words.contains(&"good"));
            (words.join(" "), label)
        })
        .unzip()
}

fn run(task: &TextTask, map: &SeededVarMap, data: &TextData, steps: usize, lr: f64) -> Result<()> {
    let vars = map.sorted_vars()?.into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            ..Default::default()
        },
    )?;
    let mut stream = TrainStream::new(data.len(), rng_for(0, "example.shuffle"));
    let mut rng = rng_for(0, "example.batch");
    for _ in 0..steps {
        let batch = task.batch(data, &stream.next_batch(32), &mut rng)?;
        opt.backward_step(&task.loss(&batch, true)?.total)?;
    }
    Ok(())
}

fn score(task: &TextTask, data: &TextData) -> Result<Score> {
    let mut s = Score::default();
    let groups = Groups::consecutive(&(0..data.len()).collect::<Vec<_>>(), 2);
    for slots in groups.batches(64) {
        s.merge(&task.score(&task.batch(data, slots, &mut rng_for(1, "example.eval"))?)?);
    }
    Ok(s)
}

fn main() -> Result<()> {
    let (texts, labels) = sentences(2000, 0);
    let (test_texts, test_labels) = sentences(400, 1);
    let tk = TextTokenizer::train(texts.iter().map(String::as_str), 100, true, 16)
        .map_err(candle_core::Error::wrap)?;
    let enc = |t: &[String], l: &[u32]| -> Result<TextData> {
        Ok(TextData::Sentences(
            SentenceData::encode(&tk, t, None, l, 2).map_err(candle_core::Error::wrap)?,
        ))
    };
    let (train, test) = (enc(&texts, &labels)?, enc(&test_texts, &test_labels)?);
    let cfg = Config {
        max_length: 16,
        ..Config::tiny()
    };
    let mux = model::Config::new(2, MuxKind::GaussianHadamard, DemuxKind::Index);
    let names = vec!["no".to_string(), "yes".to_string()];
    let map = SeededVarMap::new(0);
    let mut task = TextTask::new(
        &cfg,
        &mux,
        HeadKind::Sentence,
        &names,
        tk.vocab_size(),
        tk.pad_id,
        (0.0, 1.0),
        &map,
        &Device::Cpu,
        None,
    )?;
    run(&task, &map, &train, 300, 3e-3)?;
    println!(
        "after the warm-up: retrieval accuracy {:.3}",
        score(&task, &test)?
            .metric("retrieval_accuracy")
            .unwrap_or(f64::NAN)
    );
    task.weights = (0.9, 0.1);
    run(&task, &map, &train, 300, 1e-3)?;
    for (k, v) in score(&task, &test)?.metrics() {
        println!("test {k}: {v:.3}");
    }
    Ok(())
}
