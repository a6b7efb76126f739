//! Checks of experiment files and resolved runs that every modality shares; each error names
//! the values and the rule. What only one modality knows (its backbones' sizes, its sections'
//! cross-field rules) is its own `Modality::validate`.

use anyhow::{Result, bail, ensure};
use datamux_core::DemuxKind;
use datamux_data::Catalogue;
use datamux_pipeline::{Modality, RunConfig, WarmupConfig};

use super::wire::{MODEL_KEYS, WireModelKeys};
use crate::registry;

/// A `[model]` table (of the file, a profile or a variant): its fixed keys typed, every other
/// key a section of `modality`, checked by its typed settings.
pub fn check_model(model: &toml::Table, modality: &dyn Modality) -> Result<()> {
    let mut keys = toml::Table::new();
    for (key, value) in model {
        if MODEL_KEYS.contains(&key.as_str()) {
            keys.insert(key.clone(), value.clone());
        } else if modality.sections().contains(&key.as_str()) {
            modality
                .section(key, value)
                .map_err(|e| anyhow::anyhow!("[model.{key}]: {e}"))?;
        } else if let Some(other) = registry::owner(key) {
            bail!(
                "`model.{key}` is a setting of the {} modality; this experiment is {}",
                other.name(),
                modality.name()
            );
        } else {
            bail!(
                "unknown key `model.{key}`; [model] has {} and the {} sections {}",
                MODEL_KEYS.join(", "),
                modality.name(),
                modality.sections().join(", ")
            );
        }
    }
    toml::Value::Table(keys)
        .try_into::<WireModelKeys>()
        .map_err(|e| anyhow::anyhow!("[model]: {e}"))?;
    Ok(())
}

/// A backbone name given in a sweep, a variant or an expectation.
pub fn check_backbone(name: &str, modality: &dyn Modality, r#where: &str) -> Result<()> {
    ensure!(
        modality.backbones().contains(&name),
        "{where}: unknown {} backbone `{name}`; expected {}",
        modality.name(),
        modality.backbones().join(", ")
    );
    Ok(())
}

/// The metrics the runs write (`accuracy.parquet`), each also as `<metric>_slot_min` /
/// `_slot_max` (the worst and best instance slot).
pub const METRICS: [&str; 6] = [
    "accuracy",
    "f1",
    "cosine",
    "nn_agreement",
    "retrieval_accuracy",
    "warmup_retrieval_accuracy",
];

/// The most instances per row a run may multiplex: far above the paper's 40, and below the
/// sizes whose prefix and key tables alone exhaust a machine (N = 100 000 took ~24 GB).
pub const MAX_N: usize = 1024;

/// An `[[expect]]`: a metric that some run writes, a split that runs score.
pub fn check_expect(e: &super::Expect) -> Result<()> {
    let base = e
        .metric
        .strip_suffix("_slot_min")
        .or_else(|| e.metric.strip_suffix("_slot_max"))
        .unwrap_or(&e.metric);
    ensure!(
        METRICS.contains(&base),
        "metric `{}` is not one that runs write; expected {} (or <metric>_slot_min / _slot_max)",
        e.metric,
        METRICS.join(", ")
    );
    ensure!(
        ["test", "validation"].contains(&e.split.as_str()),
        "split `{}` is not scored; expected test or validation",
        e.split
    );
    ensure!(
        e.min.is_finite() && (0.0..=1.0).contains(&e.min),
        "min {} is not a fraction in [0, 1] (an accuracy of 65 % is 0.65)",
        e.min
    );
    Ok(())
}

/// Cross-field checks of a resolved run that every modality shares, then the modality's own.
pub fn validate(run: &RunConfig, modality: &dyn Modality, catalogue: &Catalogue) -> Result<()> {
    let (m, t) = (&run.model, &run.train);
    let n = m.n_instances;
    ensure!(n >= 1, "n_instances must be at least 1, got {n}");
    ensure!(
        n <= MAX_N,
        "n_instances {n} is above the most a run may multiplex ({MAX_N})"
    );
    ensure!(!run.data.dataset.is_empty(), "[data] dataset is not set");
    let entry = catalogue.get(&run.data.dataset)?;
    ensure!(
        modality.data_kinds().contains(&entry.kind),
        "dataset `{}` is {}, which a {} experiment cannot train on (it trains on {})",
        entry.name,
        entry.kind.name(),
        modality.name(),
        modality
            .data_kinds()
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    ensure!(t.steps >= 1, "train.steps must be at least 1");
    ensure!(
        t.eval_every >= 1 && t.eval_rows >= 1,
        "train.eval_every and train.eval_rows must be at least 1"
    );
    ensure!(
        t.lr > 0.0 && t.lr.is_finite(),
        "train.lr must be positive, got {}",
        t.lr
    );
    ensure!(
        t.batch_size >= n && t.batch_size % n == 0,
        "train.batch_size {} (instances) is not divisible by n_instances {n}",
        t.batch_size
    );
    ensure!(
        t.max_grad_norm > 0.0,
        "train.max_grad_norm must be positive"
    );
    m.mux.check_serve_n(n).map_err(anyhow::Error::msg)?;
    ensure!(
        run.speed.rows_per_call != Some(0),
        "speed.rows_per_call must be at least 1"
    );
    ensure!(
        !(m.demux.residual && m.demux.kind == DemuxKind::Mlp),
        "demux residual is for the index and rsa demultiplexers, not mlp"
    );
    if !modality.has_warmup() {
        ensure!(
            run.warmup == WarmupConfig::default(),
            "[warmup] is set, but the {} modality has no warm-up stage",
            modality.name()
        );
    } else if run.warmup.enabled {
        check_warmup(&run.warmup, n, m.demux.kind)?;
        // A warm-up would train the backbone only for the teacher's copy to overwrite it.
        ensure!(
            !t.distill.init,
            "train.distill.init starts from the N = 1 teacher; it cannot follow a warm-up \
             (set warmup.enabled = false)"
        );
    }
    modality.validate(run, catalogue)
}

fn check_warmup(w: &WarmupConfig, n: usize, demux: DemuxKind) -> Result<()> {
    ensure!(
        w.batch_size >= n && w.batch_size % n == 0,
        "warmup.batch_size {} (instances) is not divisible by n_instances {n}",
        w.batch_size
    );
    ensure!(
        w.steps >= 1 && w.lr > 0.0,
        "warmup.steps and warmup.lr must be positive"
    );
    if let Some(p) = w.dropout {
        ensure!(
            (0.0..1.0).contains(&p),
            "warmup.dropout must be in [0, 1), got {p}"
        );
    }
    if let Some(from) = w.from_n {
        ensure!(
            n > 1,
            "warmup.from_n = {from} on a run at N = 1: there is no smaller N to start from \
             (set it in a variant for N > 1)"
        );
        ensure!(
            from >= 1 && from < n,
            "warmup.from_n must be a smaller N, in 1..{n}, got {from}"
        );
        ensure!(
            demux == DemuxKind::Index,
            "warmup.from_n needs the index demultiplexer (the {} one has parameters per instance \
             slot)",
            demux.name()
        );
    }
    Ok(())
}
