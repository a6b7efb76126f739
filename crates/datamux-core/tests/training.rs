//! Gradients, fixed keys, dummy slots, determinism, checkpoint buffers and a learning test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Optimizer;
use datamux_core::init::rng_for;
use datamux_core::{DemuxKind, Groups, MuxKind, SeededVarMap, Task};

use common::{Sizes, config, optimizer, toy_data, toy_task};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

#[test]
fn every_trainable_variable_receives_a_gradient() -> Result<()> {
    let sizes = Sizes::tiny();
    let data = toy_data(12, &sizes, 0);
    for mux in [
        MuxKind::GaussianHadamard,
        MuxKind::BinaryHadamard,
        MuxKind::RandomOrtho,
        MuxKind::Hrr,
    ] {
        for demux in DemuxKind::ALL {
            let map = SeededVarMap::new(0);
            let mut cfg = config(3, mux, demux);
            cfg.mux.learn = true;
            let task = toy_task(&map, &sizes, &cfg, (1.0, 1.0))?;
            let slots: Vec<_> = (0..12).map(Some).collect();
            let batch = task.batch(&data, &slots, &mut rng_for(0, "r"))?;
            let grads = task.loss(&batch, true)?.total.backward()?;
            for (name, var) in map.sorted_vars()? {
                let g = grads.get(var.as_tensor());
                let norm = match g {
                    Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?,
                    None => 0.0,
                };
                assert!(norm > 0.0, "{mux:?}/{demux:?}: {name} got no gradient");
            }
            assert!(map.sorted_vars()?.iter().any(|(k, _)| k == "mux.delta"));
        }
    }
    Ok(())
}

#[test]
fn fixed_keys_stay_bit_identical_and_learned_keys_move() -> Result<()> {
    let sizes = Sizes::tiny();
    let data = toy_data(12, &sizes, 0);
    for learn in [false, true] {
        let map = SeededVarMap::new(0);
        let mut cfg = config(3, MuxKind::GaussianHadamard, DemuxKind::Index);
        cfg.mux.learn = learn;
        let task = toy_task(&map, &sizes, &cfg, (1.0, 1.0))?;
        assert_eq!(
            map.sorted_vars()?
                .iter()
                .any(|(k, _)| k.starts_with("mux.")),
            learn
        );
        let before = values(&task.net.multiplexer().effective_keys()?.expect("keys"))?;
        let mut opt = optimizer(&map, 1e-2)?;
        let mut rng = rng_for(0, "r");
        for step in 0..10 {
            let slots: Vec<_> = (0..12).map(|i| Some((i + step) % 12)).collect();
            let batch = task.batch(&data, &slots, &mut rng)?;
            opt.backward_step(&task.loss(&batch, true)?.total)?;
        }
        let fixed = values(&task.net.buffers()["mux.keys"])?;
        let after = values(&task.net.multiplexer().effective_keys()?.expect("keys"))?;
        let same_bits =
            |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same_bits(&before, &fixed), "the fixed keys changed");
        assert_eq!(same_bits(&before, &after), !learn, "learn = {learn}");
    }
    Ok(())
}

#[test]
fn dummy_slots_change_neither_loss_nor_metric() -> Result<()> {
    let sizes = Sizes::tiny();
    let data = toy_data(7, &sizes, 3);
    let map = SeededVarMap::new(1);
    let task = toy_task(
        &map,
        &sizes,
        &config(3, MuxKind::GaussianHadamard, DemuxKind::Index),
        (1.0, 1.0),
    )?;
    let groups = Groups::consecutive(&(0..7).collect::<Vec<_>>(), 3);
    assert_eq!(groups.rows(), 3);
    let batch = task.batch(&data, &groups.slots, &mut rng_for(0, "r"))?;
    // Flip the labels of the two dummy slots: no change in loss or score.
    let mut other = task.batch(&data, &groups.slots, &mut rng_for(0, "r"))?;
    other.labels[7] = 2;
    other.labels[8] = 1;
    let l1 = task
        .loss(&batch, false)?
        .task
        .expect("task loss")
        .to_scalar::<f32>()?;
    let l2 = task
        .loss(&other, false)?
        .task
        .expect("task loss")
        .to_scalar::<f32>()?;
    assert_eq!(l1.to_bits(), l2.to_bits());
    let (s1, s2) = (task.score(&batch)?, task.score(&other)?);
    assert_eq!(s1, s2);
    assert_eq!(s1.examples, 7);
    assert_eq!(s1.slot_total, [3, 2, 2]);
    // Retrieval never targets a dummy slot.
    assert!(
        batch
            .targets
            .slots
            .iter()
            .zip(&batch.targets.rows)
            .all(|(s, r)| {
                let row = *r as usize / (task.net.prefix_len() + sizes.len);
                batch.real[row * 3 + *s as usize]
            })
    );
    // The loss equals the mean of per-example losses over real rows only.
    let logits = task.predict(&batch)?;
    let per_row = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f32>()?;
    let mean: f32 = (0..7)
        .map(|i| -per_row[i][batch.labels[i] as usize])
        .sum::<f32>()
        / 7.0;
    assert!((mean - l1).abs() < 1e-5, "{mean} vs {l1}");
    Ok(())
}

fn train_losses(seed: u64, steps: usize) -> Result<(Vec<f32>, SeededVarMap)> {
    let sizes = Sizes::tiny();
    let data = toy_data(40, &sizes, 0);
    let map = SeededVarMap::new(seed);
    let task = toy_task(
        &map,
        &sizes,
        &config(2, MuxKind::GaussianHadamard, DemuxKind::Index),
        (0.9, 0.1),
    )?;
    let mut opt = optimizer(&map, 1e-3)?;
    let mut stream =
        datamux_core::group::TrainStream::new(data.len(), rng_for(seed, "data.shuffle"));
    let mut rng = rng_for(seed, "retrieval");
    let mut out = Vec::new();
    for _ in 0..steps {
        let batch = task.batch(&data, &stream.next_batch(8), &mut rng)?;
        let loss = task.loss(&batch, true)?.total;
        out.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    Ok((out, map))
}

#[test]
fn same_seed_same_losses_other_seed_other_weights() -> Result<()> {
    let (a, map_a) = train_losses(11, 20)?;
    let (b, _) = train_losses(11, 20)?;
    assert_eq!(a, b);
    let map_c = SeededVarMap::new(12);
    let sizes = Sizes::tiny();
    let cfg = config(2, MuxKind::GaussianHadamard, DemuxKind::Index);
    let _ = toy_task(&map_c, &sizes, &cfg, (0.9, 0.1))?;
    let fresh_a = SeededVarMap::new(11);
    let _ = toy_task(&fresh_a, &sizes, &cfg, (0.9, 0.1))?;
    let name = "backbone.layers.0.attn.q.weight";
    let get = |m: &SeededVarMap| values(m.varmap().data().lock().unwrap()[name].as_tensor());
    assert_ne!(get(&fresh_a)?, get(&map_c)?);
    assert_ne!(
        get(&fresh_a)?,
        get(&map_a)?,
        "training did not move the weights"
    );
    Ok(())
}

#[test]
fn checkpoint_keys_round_trip_and_are_checked() -> Result<()> {
    let sizes = Sizes::tiny();
    let cfg = config(3, MuxKind::RandomOrtho, DemuxKind::Index);
    let map = SeededVarMap::new(21);
    let task = toy_task(&map, &sizes, &cfg, (1.0, 0.0))?;
    let dir = std::env::temp_dir().join(format!("datamux-core-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("buffers.safetensors");
    candle_core::safetensors::save(&task.net.buffers(), &path)?;
    let saved: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)?;
    task.net.check_buffers(&saved)?;
    // The same architecture under another seed regenerates other keys and refuses the file.
    let other = toy_task(&SeededVarMap::new(22), &sizes, &cfg, (1.0, 0.0))?;
    let err = other
        .net
        .check_buffers(&saved)
        .expect_err("keys from another seed accepted");
    assert!(err.to_string().contains("mux.keys"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    let _ = DType::F32;
    Ok(())
}

/// Synthetic token retrieval at N = 2: the tiny model must recover which token each instance
/// had at each position, from the single muxed sequence. Budget: 300 AdamW steps at lr 3e-3,
/// 16 instances a step (takes a few seconds on CPU).
#[test]
fn tiny_muxnet_learns_retrieval_at_two_instances() -> Result<()> {
    const STEPS: usize = 300;
    let sizes = Sizes {
        vocab: 13,
        ..Sizes::tiny()
    };
    let train = toy_data(512, &sizes, 1);
    let valid = toy_data(64, &sizes, 2);
    let map = SeededVarMap::new(0);
    let task = toy_task(
        &map,
        &sizes,
        &config(2, MuxKind::GaussianHadamard, DemuxKind::Index),
        (0.0, 1.0),
    )?;
    let mut opt = optimizer(&map, 3e-3)?;
    let mut stream = datamux_core::group::TrainStream::new(train.len(), rng_for(0, "data.shuffle"));
    let mut rng = rng_for(0, "retrieval");
    for _ in 0..STEPS {
        let batch = task.batch(&train, &stream.next_batch(16), &mut rng)?;
        opt.backward_step(&task.loss(&batch, true)?.total)?;
    }
    let groups = Groups::consecutive(&(0..valid.len()).collect::<Vec<_>>(), 2);
    let mut score = datamux_core::Score::default();
    for slots in groups.batches(8) {
        score.merge(&task.score(&task.batch(&valid, slots, &mut rng)?)?);
    }
    let acc = score
        .metric("retrieval_accuracy")
        .expect("retrieval accuracy");
    assert!(
        acc >= 0.95,
        "retrieval accuracy {acc:.3} after {STEPS} steps"
    );
    Ok(())
}
