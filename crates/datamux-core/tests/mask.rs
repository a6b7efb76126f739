//! The key-padding mask after muxing, and that masked positions cannot leak into others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use datamux_core::encoder::{self, Encoder};
use datamux_core::{Backbone, DemuxKind, MuxKind, SeededVarMap};

use common::{Sizes, ToyInput, config, toy_task};

#[test]
fn a_position_is_masked_only_where_every_instance_pads() -> Result<()> {
    let sizes = Sizes::tiny();
    let n = 2;
    let map = SeededVarMap::new(0);
    let task = toy_task(
        &map,
        &sizes,
        &config(n, MuxKind::GaussianHadamard, DemuxKind::Index),
        (1.0, 0.0),
    )?;
    // L = 4. Position 2: instance 0 pads, instance 1 does not. Position 3: both pad.
    let ids = Tensor::new(&[[[3u32, 4, 0, 0], [5, 6, 7, 0]]], &Device::Cpu)?;
    let pad = ids.eq(0u32)?.to_dtype(DType::U8)?;
    let enc = task.net.encode(&ToyInput { ids, pad }, false)?;
    let mask = enc.pad.expect("mask").to_vec2::<u8>()?;
    // P = N + 1 = 3 prefix slots, never masked, then the four positions.
    assert_eq!(mask, [[0, 0, 0, 0, 0, 0, 1]]);
    Ok(())
}

#[test]
fn masked_positions_do_not_change_unmasked_outputs() -> Result<()> {
    let map = SeededVarMap::new(4);
    let cfg = encoder::Config {
        pre_layer_norm: false,
        ..encoder::Config::tiny()
    };
    let enc = Encoder::new(&cfg, map.var_builder(DType::F32, &Device::Cpu))?;
    let (b, t, d) = (2, 7, cfg.hidden_size);
    let rand = |name: &str| -> Result<Tensor> {
        let v = datamux_core::init::randn_vec(&mut datamux_core::init::rng_for(1, name), b * t * d);
        Tensor::from_vec(v, (b, t, d), &Device::Cpu)
    };
    let xs = rand("a")?;
    // Positions 5 and 6 are padding in both rows; overwrite them with other values.
    let pad = Tensor::new(
        &[[0u8, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]],
        &Device::Cpu,
    )?;
    let keep = Tensor::new(&[1f32, 1., 1., 1., 1., 0., 0.], &Device::Cpu)?.reshape((1, t, 1))?;
    let other = (xs.broadcast_mul(&keep)? + rand("b")?.broadcast_mul(&(1.0 - &keep)?)?)?;
    for train in [false, true] {
        let y1 = enc.forward_t(&xs, Some(&pad), train)?.narrow(1, 0, 5)?;
        let y2 = enc.forward_t(&other, Some(&pad), train)?.narrow(1, 0, 5)?;
        let diff = (y1 - y2)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-5,
            "train = {train}: masked positions changed others by {diff}"
        );
        // Without the mask the change does leak, so the test can fail.
        let y3 = enc.forward_t(&xs, None, train)?.narrow(1, 0, 5)?;
        let y4 = enc.forward_t(&other, None, train)?.narrow(1, 0, 5)?;
        let leak = (y3 - y4)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(leak > 1e-3, "unmasked control did not change ({leak})");
    }
    Ok(())
}
