//! From a merged experiment table to runs: deep merges, dotted overrides, the variants that
//! match a sweep point, and the resolved settings of each run with its modality's sections.

use anyhow::{Context as _, Result, ensure};
use datamux_core::{DemuxKind, MuxKind};
use datamux_data::Catalogue;
use datamux_pipeline::{Modality, ModelConfig, RunConfig, Sections};

use super::validate;
use super::wire::{When, WireExperiment, WireModelKeys, WireRun};
use crate::registry;

/// Deep merge: tables merge key by key, anything else is replaced.
pub fn merge(base: &mut toml::Value, over: &toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A variant matching every run, carrying the run settings of `table` (its sweep and expectations
/// apply to the experiment as a whole, not to runs).
pub fn catch_all(table: &toml::Value) -> toml::Value {
    let mut t = table.as_table().cloned().unwrap_or_default();
    for k in [
        "sweep", "expect", "variant", "name", "analysis", "modality", "compare",
    ] {
        t.remove(k);
    }
    t.insert("when".into(), toml::Value::Table(toml::Table::new()));
    toml::Value::Table(t)
}

/// Set a dotted key (`train.steps`) in a table, creating intermediate tables.
pub fn set_dotted(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .with_context(|| format!("`{key}`: `{part}` is not a table"))?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Ok(())
}

/// `--set key=value` overrides: the value is parsed as TOML, or taken as a string.
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("override `{s}` is not key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

/// One point of a sweep's product.
#[derive(Debug, Clone)]
pub struct RunPoint {
    pub dataset: String,
    pub n: usize,
    pub backbone: String,
    pub mux: MuxKind,
    pub demux: DemuxKind,
    pub seed: u64,
    pub warmup: bool,
}

pub fn matches(when: &When, run: &RunPoint) -> bool {
    (when.dataset.is_empty() || when.dataset.contains(&run.dataset))
        && (when.n_instances.is_empty() || when.n_instances.contains(&run.n))
        && (when.backbone.is_empty() || when.backbone.contains(&run.backbone))
        && (when.mux.is_empty() || when.mux.contains(&run.mux))
        && (when.demux.is_empty() || when.demux.contains(&run.demux))
        && (when.warmup.is_empty() || when.warmup.contains(&run.warmup))
}

fn variant_table(v: &toml::Value) -> Result<toml::Value> {
    let mut t = v
        .as_table()
        .cloned()
        .context("a [[variant]] must be a table")?;
    t.remove("when");
    t.remove("skip");
    Ok(toml::Value::Table(t))
}

/// What every run of one experiment is resolved against.
pub struct Resolver<'a> {
    pub raw: &'a toml::Value,
    pub variants: &'a [toml::Value],
    pub wire: &'a WireExperiment,
    pub modality: &'static dyn Modality,
    pub catalogue: &'a Catalogue,
    pub shown: String,
}

impl Resolver<'_> {
    /// The run at `p`, or `None` when a variant skips it.
    pub fn run(&self, p: &RunPoint) -> Result<Option<RunConfig>> {
        let shown = &self.shown;
        let mut v = self.raw.clone();
        set_dotted(&mut v, "data.dataset", p.dataset.clone().into())?;
        set_dotted(&mut v, "model.n_instances", (p.n as i64).into())?;
        set_dotted(&mut v, "model.backbone", p.backbone.clone().into())?;
        set_dotted(&mut v, "model.mux.kind", p.mux.name().into())?;
        set_dotted(&mut v, "model.demux.kind", p.demux.name().into())?;
        set_dotted(&mut v, "warmup.enabled", p.warmup.into())?;
        // Variants apply in file order; a later one overrides an earlier one.
        for (typed, raw_variant) in self.wire.variant.iter().zip(self.variants) {
            if matches(&typed.when, p) {
                if typed.skip {
                    return Ok(None);
                }
                merge(&mut v, &variant_table(raw_variant)?);
            }
        }
        let t = v.as_table_mut().context("not a table")?;
        t.insert("experiment".into(), self.wire.name.clone().into());
        t.insert("modality".into(), self.modality.name().into());
        t.insert("seed".into(), (p.seed as i64).into());
        t.remove("profile");
        let model = match t.remove("model") {
            Some(toml::Value::Table(m)) => m,
            _ => toml::Table::new(),
        };
        let what = || format!("{shown}: run {} n={}", p.backbone, p.n);
        let wire: WireRun = v.try_into().with_context(what)?;
        let model = self.model(&model).with_context(what)?;
        let mut run = RunConfig {
            experiment: wire.experiment,
            modality: wire.modality,
            seed: wire.seed,
            data: wire.data,
            model,
            train: wire.train,
            warmup: wire.warmup,
            speed: wire.speed,
            warmup_source: None,
            teacher: None,
        };
        // The N = 1 run is the teacher and learns from labels alone, so that it is the same run
        // (and id) whether or not the file distils.
        if run.model.n_instances == 1 {
            run.train.distill = Default::default();
        }
        validate::validate(&run, self.modality, self.catalogue)
            .with_context(|| format!("{shown}: run {}", run.run_id()))?;
        if let (true, Some(from)) = (run.warmup.enabled, run.warmup.from_n) {
            let at = RunPoint {
                n: from,
                warmup: true,
                ..p.clone()
            };
            let source = self.run(&at)?.with_context(|| {
                format!(
                    "{shown}: run {}: warmup.from_n = {from}, but the run at N = {from} is skipped",
                    run.run_id()
                )
            })?;
            // The grown checkpoint must load: same data, warm-up model and mux settings.
            let (a, b) = (
                self.modality.warmup_run(&source)?,
                self.modality.warmup_run(&run)?,
            );
            ensure!(
                a.model.sections == b.model.sections
                    && source.data == run.data
                    && source.model.mux == run.model.mux,
                "{shown}: run {}: warmup.from_n = {from}, but the run at N = {from} has other \
                 data, model or mux settings",
                run.run_id()
            );
            run.warmup_source = Some(Box::new(source));
        }
        if run.train.distill.needs_teacher() {
            ensure!(
                self.modality.distills(),
                "{shown}: run {}: train.distill: the {} modality has no distillation",
                run.run_id(),
                self.modality.name()
            );
            let at = RunPoint { n: 1, ..p.clone() };
            let teacher = self.run(&at)?.with_context(|| {
                format!(
                    "{shown}: run {}: train.distill needs the run at N = 1 as its teacher, but it \
                     is skipped",
                    run.run_id()
                )
            })?;
            run.teacher = Some(Box::new(teacher));
        }
        Ok(Some(run))
    }

    /// The model settings of a run from its merged `[model]` table: the fixed keys, then every
    /// section of the run's layout with its owner's defaults filled in.
    fn model(&self, table: &toml::Table) -> Result<ModelConfig> {
        let mut keys = table.clone();
        let mut sections = Sections::default();
        for (name, owner) in registry::layout(self.modality) {
            let value = keys
                .remove(name)
                .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
            let raw = owner
                .section(name, &value)
                .with_context(|| format!("[model.{name}]"))?;
            sections.set(name, &raw)?;
        }
        let fixed: WireModelKeys = toml::Value::Table(keys).try_into().context("[model]")?;
        Ok(ModelConfig {
            backbone: fixed.backbone,
            n_instances: fixed.n_instances.unwrap_or(1),
            mux: fixed.mux,
            demux: fixed.demux,
            sections,
        })
    }
}
