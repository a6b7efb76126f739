//! Text tasks: head shapes, word-level labels, and errors on bad input that name the row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{Device, Result};
use datamux_core::init::rng_for;
use datamux_core::{DemuxKind, Frontend, MuxKind, SeededVarMap, Task, model};
use datamux_text::task::{HeadKind, IGNORE, SentenceData, TextData, TextTask, TokenData};
use datamux_text::{Config, TextTokenizer};

fn tokenizer() -> TextTokenizer {
    let corpus = [
        "a quiet film",
        "a loud film",
        "the cast is good",
        "the plot is dull",
        "new york is big",
    ];
    // 20 tokens: room for a word split into many sub-tokens without truncating the next one.
    TextTokenizer::train(corpus.iter().copied(), 80, true, 20).expect("train")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn task(
    tk: &TextTokenizer,
    head: HeadKind,
    classes: usize,
    n: usize,
    demux: DemuxKind,
) -> Result<TextTask> {
    let cfg = Config {
        max_length: 20,
        ..Config::tiny()
    };
    let mux = model::Config::new(n, MuxKind::GaussianHadamard, demux);
    let names: Vec<String> = (0..classes)
        .map(|i| {
            if i == 0 {
                "O".into()
            } else {
                format!("B-X{i}")
            }
        })
        .collect();
    TextTask::new(
        &cfg,
        &mux,
        head,
        &names,
        tk.vocab_size(),
        tk.pad_id,
        (0.9, 0.1),
        &SeededVarMap::new(0),
        &Device::Cpu,
        None,
    )
}

#[test]
fn sentence_and_token_heads_have_their_shapes() -> Result<()> {
    let tk = tokenizer();
    let texts = strings(&["a quiet film", "the cast is good", "a loud film"]);
    let sent = TextData::Sentences(SentenceData::encode(&tk, &texts, None, &[0, 1, 0], 2).unwrap());
    let words: Vec<Vec<String>> = texts
        .iter()
        .map(|t| t.split(' ').map(str::to_string).collect())
        .collect();
    let tags = vec![vec![0, 0, 1], vec![0, 2, 0, 0], vec![0, 1, 1]];
    let tok = TextData::Tokens(TokenData::encode(&tk, &words, &tags, 3).unwrap());
    for demux in DemuxKind::ALL {
        // 3 examples at N = 2: 2 rows, one dummy slot.
        let slots = datamux_core::Groups::consecutive(&[0, 1, 2], 2).slots;
        let t = task(&tk, HeadKind::Sentence, 2, 2, demux)?;
        let b = t.batch(&sent, &slots, &mut rng_for(0, "r"))?;
        assert_eq!(t.predict(&b)?.dims(), [4, 2], "{demux:?}");
        assert!(t.loss(&b, true)?.total.to_scalar::<f32>()?.is_finite());
        assert_eq!(t.score(&b)?.examples, 3);
        let t = task(&tk, HeadKind::Token, 3, 2, demux)?;
        let b = t.batch(&tok, &slots, &mut rng_for(0, "r"))?;
        let l = b.len;
        assert_eq!(t.predict(&b)?.dims(), [4, l, 3], "{demux:?}");
        let s = t.score(&b)?;
        assert!(s.spans.is_some() && s.metric("f1").is_some());
        assert!(t.loss(&b, true)?.total.to_scalar::<f32>()?.is_finite());
    }
    Ok(())
}

/// Inference embeds and muxes in one pass where the mux is per-slot scales; the backbone's input
/// must be what the two-step path (embed, then mux) gives, for every mux and with padding.
#[test]
fn fused_embed_and_mux_agrees_with_two_steps() -> Result<()> {
    let tk = tokenizer();
    let texts = strings(&[
        "a quiet film",
        "the cast is good",
        "a loud film",
        "new york",
    ]);
    let data =
        TextData::Sentences(SentenceData::encode(&tk, &texts, None, &[0, 1, 0, 1], 2).unwrap());
    let slots = datamux_core::Groups::consecutive(&[0, 1, 2, 3], 3).slots; // one dummy slot
    for kind in MuxKind::ALL {
        let cfg = Config {
            max_length: 20,
            ..Config::tiny()
        };
        let mux = model::Config::new(3, kind, DemuxKind::Index);
        let t = TextTask::new(
            &cfg,
            &mux,
            HeadKind::Sentence,
            &strings(&["a", "b"]),
            tk.vocab_size(),
            tk.pad_id,
            (0.9, 0.1),
            &SeededVarMap::new(0),
            &Device::Cpu,
            None,
        )?;
        let b = t.batch(&data, &slots, &mut rng_for(0, "r"))?;
        let net = &t.net;
        let (fused, fused_pad) = net.embed_and_mux(&b.input, false)?;
        let (two, two_pad) = net.mux_input(net.frontend.embed(&b.input, false)?)?;
        assert_eq!(fused.dims(), two.dims(), "{kind:?}");
        let diff = (&fused - &two)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{kind:?}: diff {diff}");
        let (p, q) = (fused_pad.unwrap(), two_pad.unwrap());
        assert_eq!(p.to_vec2::<u8>()?, q.to_vec2::<u8>()?, "{kind:?}");
        assert!(
            p.sum_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?
                > 0.0
        );
    }
    Ok(())
}

#[test]
fn only_the_first_sub_token_of_a_word_is_labelled() {
    let tk = tokenizer();
    // "yorkshire" is not in the tiny vocabulary as one piece, so it splits into sub-tokens.
    let words = vec![strings(&["new", "yorkshire", "film"])];
    let data = TokenData::encode(&tk, &words, &[vec![1, 2, 0]], 3).unwrap();
    let labelled: Vec<u32> = data.token_labels[0]
        .iter()
        .copied()
        .filter(|l| *l != IGNORE)
        .collect();
    assert_eq!(labelled, [1, 2, 0]);
    assert!(
        data.ids[0].len() > 5,
        "[CLS] new york-shire film [SEP]: {:?}",
        data.ids[0]
    );
    let words_of_first: Vec<u32> = data.token_words[0]
        .iter()
        .copied()
        .filter(|w| *w != IGNORE)
        .collect();
    assert_eq!(words_of_first, [0, 1, 2]);
}

#[test]
fn bad_text_input_names_the_row() {
    let tk = tokenizer();
    let e = SentenceData::encode(&tk, &strings(&["a film", ""]), None, &[0, 1], 2)
        .expect_err("empty text");
    assert_eq!(e.to_string(), "row 1: empty text");
    let e = SentenceData::encode(&tk, &strings(&["a film", "good"]), None, &[0, 5], 2)
        .expect_err("label 5 of 2");
    assert_eq!(e.to_string(), "row 1: label 5 is outside the 2 labels");
    let e = SentenceData::encode(&tk, &strings(&["a film"]), Some(&strings(&[" "])), &[0], 2)
        .expect_err("empty pair");
    assert_eq!(e.to_string(), "row 0: empty text");
    let words = vec![strings(&["a", "film"]), strings(&["the", "cast", "is"])];
    let e = TokenData::encode(&tk, &words, &[vec![0, 0], vec![0, 0]], 3).expect_err("short tags");
    assert_eq!(e.to_string(), "row 1: 3 words but 2 tags");
    let e =
        TokenData::encode(&tk, &words, &[vec![0, 0], vec![0, 9, 0]], 3).expect_err("tag 9 of 3");
    assert_eq!(e.to_string(), "row 1: label 9 is outside the 3 labels");
}
