//! Shape contract of every mux x demux pair, and the multiplexer invariants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use datamux_core::demux::Positions;
use datamux_core::mux::{self, Multiplexer};
use datamux_core::{DemuxKind, MuxKind, SeededVarMap, Task};

use common::{Sizes, config, toy_data, toy_task};

#[test]
fn every_mux_and_demux_pair_keeps_the_shape_contract() -> Result<()> {
    let sizes = Sizes::tiny();
    let (n, l, d) = (3, sizes.len, sizes.enc.hidden_size);
    let data = toy_data(8, &sizes, 0); // 8 examples at N = 3: 3 rows, one dummy slot
    for mux in MuxKind::ALL {
        for demux in DemuxKind::ALL {
            let map = SeededVarMap::new(1);
            let task = toy_task(&map, &sizes, &config(n, mux, demux), (1.0, 1.0))?;
            let slots = datamux_core::Groups::consecutive(&(0..8).collect::<Vec<_>>(), n).slots;
            let batch = task.batch(&data, &slots, &mut datamux_core::init::rng_for(0, "r"))?;
            let p = task.net.prefix_len();
            assert_eq!(
                p,
                if demux == DemuxKind::Index { n + 1 } else { 1 },
                "{mux:?} {demux:?}"
            );
            let enc = task.net.encode(&batch.input, false)?;
            assert_eq!(enc.hidden.dims(), [3, p + l, d], "{mux:?} {demux:?}");
            let z = task.net.demux(&enc, Positions::Summary, false)?;
            assert_eq!(z.dims(), [3, n, 1, d], "{mux:?} {demux:?}");
            let z = task.net.demux(&enc, Positions::Tokens, false)?;
            assert_eq!(z.dims(), [3, n, l, d], "{mux:?} {demux:?}");
            assert_eq!(task.predict(&batch)?.dims(), [3 * n, sizes.classes]);
            let losses = task.loss(&batch, true)?;
            assert!(
                losses.total.to_scalar::<f32>()?.is_finite(),
                "{mux:?} {demux:?}"
            );
        }
    }
    Ok(())
}

fn multiplexer(cfg: &mux::Config, n: usize, d: usize) -> Result<Multiplexer> {
    let map = SeededVarMap::new(5);
    Multiplexer::new(
        cfg,
        n,
        d,
        5,
        map.var_builder(DType::F32, &Device::Cpu).pp("mux"),
    )
}

fn randn(shape: (usize, usize, usize, usize)) -> Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    let v = datamux_core::init::randn_vec(&mut datamux_core::init::rng_for(9, "x"), count);
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn identity_at_one_instance_returns_the_input() -> Result<()> {
    let (b, l, d) = (2, 7, 12);
    let xs = randn((b, 1, l, d))?;
    for kind in [MuxKind::Identity, MuxKind::BinaryHadamard] {
        // A single binary chunk covers all of D: the key is all ones.
        let m = multiplexer(&mux::Config::with_kind(kind), 1, d)?;
        let ys = m.forward(&xs)?;
        assert_eq!(ys.dims(), [b, l, d]);
        assert_eq!(max_abs_diff(&ys, &xs.squeeze(1)?)?, 0.0, "{kind:?}");
    }
    Ok(())
}

#[test]
fn muxes_combine_as_documented() -> Result<()> {
    let (b, n, l, d) = (2, 3, 7, 12);
    let xs = randn((b, n, l, d))?;
    // Gaussian: mean over N of key_i * x_i, each key of norm exactly 20.
    let m = multiplexer(&mux::Config::with_kind(MuxKind::GaussianHadamard), n, d)?;
    let keys = m.effective_keys()?.expect("gaussian keys");
    let norms = keys.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    assert!(norms.iter().all(|v| (v - 20.0).abs() < 1e-3), "{norms:?}");
    let want = xs
        .broadcast_mul(&keys.reshape((1, n, 1, d))?)?
        .sum(1)?
        .affine(1.0 / n as f64, 0.0)?;
    assert!(max_abs_diff(&m.forward(&xs)?, &want)? < 1e-5);
    // Ortho: sum over N of W_i x_i divided by sqrt(N), and every W_i orthogonal.
    let m = multiplexer(&mux::Config::with_kind(MuxKind::RandomOrtho), n, d)?;
    let w = m.effective_keys()?.expect("ortho keys"); // (N, D, D)
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    for i in 0..n {
        let wi = w.get(i)?;
        assert!(
            max_abs_diff(&wi.t()?.matmul(&wi)?, &eye)? < 1e-5,
            "QᵀQ of slot {i}"
        );
    }
    let mut want = Tensor::zeros((b, l, d), DType::F32, &Device::Cpu)?;
    for i in 0..n {
        let xi = xs.narrow(1, i, 1)?.squeeze(1)?; // (B, L, D)
        want = (want + xi.broadcast_matmul(&w.get(i)?.t()?)?)?;
    }
    let want = (want / (n as f64).sqrt())?;
    assert!(max_abs_diff(&m.forward(&xs)?, &want)? < 1e-4);
    Ok(())
}

/// `hrr`: Σᵢ kᵢ ⊛ xᵢ / √N with the circular convolution written out; the `hrr` demux with the
/// mux's own keys inverts a single binding exactly (N = 1, unitary keys), and from a mix of three
/// it recovers each instance as the vector closest to its own.
#[test]
fn hrr_binds_by_circular_convolution_and_unbinds_by_correlation() -> Result<()> {
    let dev = Device::Cpu;
    let (b, n, l, d) = (2, 3, 5, 9);
    let xs = randn((b, n, l, d))?;
    let m = multiplexer(&mux::Config::with_kind(MuxKind::Hrr), n, d)?;
    assert!(m.is_position_wise() && m.slot_scales()?.is_none());
    let k = m.effective_keys()?.expect("hrr keys").to_vec2::<f32>()?; // (N, D)
    let xv = xs.flatten_all()?.to_vec1::<f32>()?;
    let at = |bi: usize, i: usize, p: usize, c: usize| xv[((bi * n + i) * l + p) * d + c];
    let mut want = vec![0f32; b * l * d];
    for bi in 0..b {
        for p in 0..l {
            for a in 0..d {
                let s: f64 = (0..n)
                    .flat_map(|i| (0..d).map(move |c| (i, c)))
                    .map(|(i, c)| f64::from(k[i][(a + d - c) % d]) * f64::from(at(bi, i, p, c)))
                    .sum();
                want[(bi * l + p) * d + a] = (s / (n as f64).sqrt()) as f32;
            }
        }
    }
    let want = Tensor::from_vec(want, (b, l, d), &dev)?;
    assert!(max_abs_diff(&m.forward(&xs)?, &want)? < 1e-5);

    // The demux keyed with the mux's keys: exact at N = 1, closest-to-own at N = 3, D = 257.
    for (n, d) in [(1, 9), (3, 257)] {
        let m = multiplexer(&mux::Config::with_kind(MuxKind::Hrr), n, d)?;
        let map = SeededVarMap::new(6);
        let demux = datamux_core::demux::Demux::new(
            &datamux_core::demux::Config::with_kind(DemuxKind::Hrr),
            n,
            d,
            map.var_builder(DType::F32, &dev).pp("demux"),
        )?;
        let keys = m.effective_keys()?.expect("hrr keys");
        map.varmap().data().lock().unwrap()["demux.hrr.keys"].set(&keys)?;
        let xs = randn((1, n, 1, d))?;
        let mixed = m.forward(&xs)?; // (1, 1, D)
        let z = demux.forward_t(&mixed, 0, Positions::Summary, false)?; // (1, N, 1, D)
        assert_eq!(z.dims(), [1, n, 1, d]);
        let z = z.reshape((n, d))?;
        let x = xs.reshape((n, d))?;
        if n == 1 {
            assert!(max_abs_diff(&z, &x)? < 1e-5, "N = 1 unbinding is exact");
            continue;
        }
        let unit = |t: &Tensor| t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?);
        let cos = unit(&z)?.matmul(&unit(&x)?.t()?)?.to_vec2::<f32>()?; // (N, N)
        for (i, row) in cos.iter().enumerate() {
            for (j, c) in row.iter().enumerate() {
                if i != j {
                    assert!(row[i] > c + 0.2, "slot {i}: {row:?}");
                }
            }
            // Each bound vector carries 1/√N of the mix: cosine about 1/√3.
            assert!(row[i] > 0.45, "slot {i}: {row:?}");
        }
    }
    Ok(())
}

/// Learned `hrr` maps are kept between inference calls (crate::cache): what inference returns
/// always equals the training path's fresh build, before and after the keys are written in place.
#[test]
fn learned_hrr_maps_cached_at_inference_follow_their_keys() -> Result<()> {
    let dev = Device::Cpu;
    let (b, n, l, d) = (2, 3, 4, 11);
    let map = SeededVarMap::new(7);
    let vb = map.var_builder(DType::F32, &dev);
    let learned = mux::Config {
        learn: true,
        ..mux::Config::with_kind(MuxKind::Hrr)
    };
    let m = Multiplexer::new(&learned, n, d, 7, vb.pp("mux"))?;
    let demux_cfg = datamux_core::demux::Config::with_kind(DemuxKind::Hrr);
    let demux = datamux_core::demux::Demux::new(&demux_cfg, n, d, vb.pp("demux"))?;
    let xs = randn((b, n, l, d))?;
    let both = |train: bool| -> Result<Tensor> {
        let mixed = m.forward_t(&xs, None, train)?; // (B, L, D)
        demux.forward_t(&mixed, 0, Positions::Tokens, train) // (B, N, L, D)
    };
    let before = both(false)?;
    assert!(max_abs_diff(&before, &both(false)?)? == 0.0);
    assert!(max_abs_diff(&before, &both(true)?)? < 1e-5);
    // An optimizer step or a checkpoint load writes the variables in place.
    for name in ["mux.delta", "demux.hrr.keys"] {
        let var = map.varmap().data().lock().unwrap()[name].clone();
        var.set(&var.as_tensor().affine(0.5, 0.1)?)?;
    }
    let after = both(false)?;
    assert!(
        max_abs_diff(&after, &before)? > 1e-3,
        "the new keys are used"
    );
    assert!(max_abs_diff(&after, &both(true)?)? < 1e-5);
    Ok(())
}

#[test]
fn index_prefix_slot_i_of_instance_i_holds_its_marker() -> Result<()> {
    let sizes = Sizes::tiny();
    let n = 3;
    let map = SeededVarMap::new(2);
    let task = toy_task(
        &map,
        &sizes,
        &config(n, MuxKind::Identity, DemuxKind::Index),
        (1.0, 0.0),
    )?;
    let table = map.varmap().data().lock().unwrap()["demux.index_embed.weight"]
        .as_tensor()
        .clone();
    assert_eq!(table.dims(), [n + 2, sizes.enc.hidden_size]);
    let prefix = task.net.prefix().expect("index prefix").tensor()?; // (N, P, D)
    assert_eq!(prefix.dims(), [n, n + 1, sizes.enc.hidden_size]);
    for i in 0..n {
        for k in 0..=n {
            let want = if k == n {
                n + 1
            } else if k == i {
                i
            } else {
                n
            };
            let got = prefix.get(i)?.get(k)?;
            assert_eq!(
                max_abs_diff(&got, &table.get(want)?)?,
                0.0,
                "instance {i}, slot {k}"
            );
        }
    }
    Ok(())
}

/// The prefix is muxed once and broadcast; the result must equal muxing `[prefix ; xs]` row by
/// row, the definition.
#[test]
fn muxing_the_prefix_once_equals_muxing_every_row() -> Result<()> {
    let sizes = Sizes::tiny();
    let n = 3;
    let data = toy_data(6, &sizes, 4);
    for mux in MuxKind::ALL {
        for demux in DemuxKind::ALL {
            let map = SeededVarMap::new(3);
            let task = toy_task(&map, &sizes, &config(n, mux, demux), (1.0, 0.0))?;
            if !task.net.multiplexer().is_position_wise() {
                continue; // contextual_mux_masks_padding_and_keeps_the_prefix_apart
            }
            let slots: Vec<_> = (0..6).map(Some).collect();
            let batch = task.batch(&data, &slots, &mut datamux_core::init::rng_for(0, "r"))?;
            let emb = datamux_core::Frontend::embed(&task.net.frontend, &batch.input, false)?;
            let (b, _, _, d) = emb.xs.dims4()?;
            let prefix = task
                .net
                .prefix()
                .expect("sequence backbones have a prefix")
                .tensor()?;
            let p = prefix.dim(1)?;
            let pre = prefix.unsqueeze(0)?.broadcast_as((b, n, p, d))?;
            let want = task
                .net
                .multiplexer()
                .forward(&Tensor::cat(&[&pre, &emb.xs], 2)?)?;
            let (got, _) = task.net.mux_input(emb)?;
            assert!(max_abs_diff(&got, &want)? < 1e-5, "{mux:?} {demux:?}");
        }
    }
    Ok(())
}

#[test]
fn slot_mean_is_the_mean_over_slots() -> Result<()> {
    let dev = Device::Cpu;
    for n in [1, 3] {
        let xs = Tensor::randn(0f32, 1.0, (2, n, 5, 7), &dev)?;
        // A non-contiguous input too: the mux may receive a transposed view.
        let xt = Tensor::randn(0f32, 1.0, (2, n, 7, 5), &dev)?.transpose(2, 3)?;
        for x in [&xs, &xt] {
            let diff = (mux::slot_mean(x)? - x.mean(1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "N = {n}: {diff}");
        }
    }
    Ok(())
}

/// The contextual mux: padding appended to an instance changes nothing at the real positions
/// (both layers mask it), each instance's content reaches every output position of the mix
/// through the across-instance layer, and gradients reach both layers.
#[test]
fn contextual_mux_masks_padding_and_keeps_the_prefix_apart() -> Result<()> {
    let dev = Device::Cpu;
    let (b, n, l, d) = (2, 3, 5, 20);
    let map = SeededVarMap::new(4);
    let m = Multiplexer::new(
        &mux::Config::with_kind(MuxKind::Contextual),
        n,
        d,
        0,
        map.var_builder(DType::F32, &dev).pp("mux"),
    )?;
    assert!(!m.is_position_wise() && m.slot_scales()?.is_none());
    let xs = Tensor::randn(0f32, 1.0, (b, n, l, d), &dev)?;
    let none = Tensor::zeros((b, n, l), DType::U8, &dev)?;
    let base = m.forward_t(&xs, Some(&none), false)?;
    assert_eq!(base.dims(), [b, l, d]);
    // Two padding positions (zeros, as frontends give them) appended to every instance.
    let longer = Tensor::cat(&[&xs, &Tensor::zeros((b, n, 2, d), DType::F32, &dev)?], 2)?;
    let pad = Tensor::cat(&[&none, &Tensor::ones((b, n, 2), DType::U8, &dev)?], 2)?;
    let padded = m.forward_t(&longer, Some(&pad), false)?.narrow(1, 0, l)?;
    assert!(max_abs_diff(&padded, &base)? < 1e-5);
    // Changing instance 2's last token changes the mix at position 0 (within, then across).
    let bumped = xs.slice_assign(
        &[0..b, 2..3, l - 1..l, 0..d],
        &Tensor::ones((b, 1, 1, d), DType::F32, &dev)?,
    )?;
    let moved = m.forward_t(&bumped, Some(&none), false)?;
    assert!(max_abs_diff(&moved.narrow(1, 0, 1)?, &base.narrow(1, 0, 1)?)? > 1e-4);
    // Both layers train.
    let grads = m
        .forward_t(&xs, Some(&none), true)?
        .sqr()?
        .sum_all()?
        .backward()?;
    for (name, var) in map.sorted_vars()? {
        let g = grads.get(var.as_tensor());
        let size = match g {
            Some(g) => g.abs()?.max_all()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        // The attention key biases shift every score of a query equally: no gradient.
        if !name.contains("attn.k.bias") {
            assert!(size > 0.0, "no gradient for {name}");
        }
    }
    assert!(
        map.sorted_vars()?
            .iter()
            .any(|(n, _)| n.starts_with("mux.within."))
    );
    assert!(
        map.sorted_vars()?
            .iter()
            .any(|(n, _)| n.starts_with("mux.across."))
    );
    Ok(())
}
