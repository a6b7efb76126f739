//! A run's memory, estimated before it starts, so that a run that cannot fit is refused with
//! both figures instead of being killed by the kernel ("worker exited with signal: 9") after it
//! has taken the machine. An estimate of the peak of one training step, from the model's shape:
//! every parameter four times (the weights, their gradients, Adam's two moments), and the
//! activations that backward keeps, counted generously (the composed softmax and LayerNorm of
//! training keep several tensors of each shape, house-style §2.14). Measured against the peak
//! resident size of real runs (2026-12-02, `/usr/bin/time -v`, short runs of the quick
//! settings): text N = 10 0.34 GB against 1.2 GiB estimated, MiniLM on wnut16 at N = 5 1.9 GB
//! against 2.9 GiB (6.1 GiB when its config.json is not at hand and BERT-base is assumed),
//! LeNet at N = 16 1.04 GB against 1.3 GiB.
//! It is there to refuse what cannot fit, not to plan to the megabyte.

use datamux_core::{DemuxKind, MuxKind};

/// The shape of a run's model and of one step's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Parameters of the backbone and the head, without the mux and demux.
    pub params: u64,
    /// Rows (muxed) the backbone sees per step: `batch_size / N`.
    pub rows: u64,
    /// Positions per row (a demux prefix included); 1 for a backbone without positions.
    pub seq: u64,
    pub width: u64,
    /// The feed-forward width (the widest hidden layer of a backbone without attention).
    pub ffn: u64,
    /// Attention heads; 0 for a backbone without attention.
    pub heads: u64,
    pub layers: u64,
    /// Scores per position of the widest output (a retrieval head's vocabulary, else the
    /// classes).
    pub outputs: u64,
}

/// Parameters of the multiplexer and the demultiplexer at `n` instances and width `d`.
pub fn mux_demux_params(n: u64, d: u64, mux: MuxKind, demux: DemuxKind) -> u64 {
    let keys = match mux {
        MuxKind::Identity => 0,
        MuxKind::GaussianHadamard | MuxKind::BinaryHadamard | MuxKind::Hrr => n * d,
        MuxKind::RandomOrtho => n * d * d,
        // Two Transformer layers (4 d^2 + 8 d^2 each, an FFN of 4 d) and the keys.
        MuxKind::Contextual => 24 * d * d + n * d,
    };
    let slots = match demux {
        // N + 1 prefix slots and the shared 2d -> d layer.
        DemuxKind::Index => (n + 1) * d + 2 * d * d,
        // One d -> d -> d MLP per slot.
        DemuxKind::Mlp => n * 2 * d * d,
        DemuxKind::Rsa => n * d + 4 * d * d,
        // N unbinding keys.
        DemuxKind::Hrr => n * d,
    };
    keys + slots
}

/// Floats one element of each kept activation costs: forward value, its gradient, and the
/// composed ops' intermediates.
const KEPT: u64 = 3;

/// Bytes of one training step's peak (f32), `inference` for a forward pass alone.
pub fn bytes(s: &Shape, inference: bool) -> u64 {
    let tokens = s.rows * s.seq;
    // Per layer: the attention block's projections, residuals and norms (~12 width-sized
    // tensors), the FFN's two (ffn-sized), the scores (heads x seq x seq) thrice (scores,
    // softmax, dropout).
    let per_layer = tokens * (12 * s.width + 2 * s.ffn) + s.rows * s.heads * s.seq * s.seq * 3;
    let head = tokens * s.outputs * 2;
    let (params, kept) = if inference {
        (s.params, 1)
    } else {
        (s.params * 4, KEPT)
    };
    4 * (params + kept * (s.layers.max(1) * per_layer + head))
        // The process itself: the binary, the decoded data (MNIST's 70 000 images as f32 are
        // 220 MB), the allocator's slack.
        + (1 << 30)
}

/// The memory the runs may use: `DATAMUX_MEMORY_LIMIT` where set (`12GiB`, `512MiB` or bytes;
/// for a shared machine), else `MemAvailable` of `/proc/meminfo`; `None` where neither can be
/// read (then nothing is refused).
pub fn available() -> Option<u64> {
    if let Some(limit) = std::env::var_os("DATAMUX_MEMORY_LIMIT") {
        return parse_size(&limit.to_string_lossy());
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `12GiB`, `512MiB`, `64KiB` or a plain number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * scale as f64) as u64)
}

/// Bytes as GiB with one decimal.
pub fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: u64, batch: u64) -> Shape {
        Shape {
            params: 8000 * 128 + 2 * (4 * 128 * 128 + 2 * 128 * 512),
            rows: batch / n,
            seq: 64 + n,
            width: 128,
            ffn: 512,
            heads: 4,
            layers: 2,
            outputs: 8000,
        }
    }

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!(parse_size("12GiB"), Some(12 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("12GB"), None);
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn estimates_grow_with_the_shape_and_training_costs_more() {
        let small = bytes(&text(1, 16), false);
        assert!(bytes(&text(1, 32), false) > small);
        assert!(bytes(&text(1, 16), true) < small);
        // The quick text runs are a few hundred MB above the process itself.
        assert!(small < 2 << 30, "{}", gib(small));
        // N = 100 000 with its prefix: far above any machine.
        let huge = Shape {
            params: text(1, 16).params
                + mux_demux_params(100_000, 128, MuxKind::RandomOrtho, DemuxKind::Mlp),
            ..text(100_000, 100_000)
        };
        assert!(
            bytes(&huge, false) > 1 << 40,
            "{}",
            gib(bytes(&huge, false))
        );
    }
}
