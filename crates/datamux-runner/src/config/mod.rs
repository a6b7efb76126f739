//! Experiment files: TOML in `experiments/`, checked at parse time, expanded into runs.
//!
//! A file states only what differs from the defaults. Sections: `modality` (a name of the
//! registry), `[data]`, `[model]` (backbone, mux, demux and the modality's own tables),
//! `[train]`, `[warmup]` (modalities with a warm-up stage), `[sweep]` (lists whose product gives
//! the runs), `[speed]`, `[[expect]]`, `[[variant]]` (settings applied to the runs a `when`
//! table matches) and `[profile.<name>]` (settings merged over the file for `--profile <name>`;
//! `quick`, `standard`, `paper`, `smoke`).
//!
//! Every key is checked against the typed sections when the file is read, so a misspelt key
//! anywhere (also inside profiles and variants) fails naming it (with the line and column outside
//! `[model]`). Profiles, overrides and variants are merged into the raw TOML before typed
//! parsing (house-style §2.6).
//!
//! - `wire.rs`: the typed shape of a file;
//! - `expand.rs`: merging, overrides, variants and the resolved runs;
//! - `validate.rs`: the checks every modality shares.

mod expand;
mod validate;
mod wire;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use datamux_data::Catalogue;

pub use datamux_pipeline::{
    DataConfig, ModelConfig, RunConfig, SpeedConfig, TrainConfig, WarmupConfig,
};
pub use expand::{merge, parse_override};
pub use wire::{Expect, SweepConfig, When};

use expand::{Resolver, RunPoint, catch_all, set_dotted};
use wire::WireExperiment;

use crate::registry;

/// One experiment file, its profile applied and its sweep expanded.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub path: PathBuf,
    pub profile: String,
    pub analysis: String,
    /// Experiments the report compares with (`compare` in the file).
    pub compare: Vec<String>,
    /// The registry name of its modality.
    pub modality: &'static str,
    pub runs: Vec<RunConfig>,
    /// The speed points: one per distinct model of `runs`, and an N = 1 base of the same
    /// backbone and size for each model that has none (`speed_points`).
    pub speed: Vec<RunConfig>,
    pub expect: Vec<Expect>,
}

/// One speed point per distinct model (the first dataset and seed of each backbone, size, mux,
/// demux, N and warm-up: the other datasets of one model differ in the head alone), and where a (dataset, backbone, size) has no N = 1 point (the standard
/// text grid's width 256 starts at N = 5) an N = 1 copy of its first point, so that every
/// speedup is taken against the same width. Speed runs use fresh weights: the copy trains
/// nothing. A model of several widths (`mux.serve_n`) has none: at each width it costs what the
/// dedicated model of its N_max costs, and `datamux loadtest` measures it served.
fn speed_points(modality: &dyn datamux_pipeline::Modality, runs: &[RunConfig]) -> Vec<RunConfig> {
    let size = |r: &RunConfig| modality.model_size(r).unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let mut points: Vec<RunConfig> = runs
        .iter()
        .filter(|r| r.speed.enabled && r.model.mux.serve_n.is_empty())
        .filter(|r| {
            let m = &r.model;
            seen.insert((
                m.backbone.clone(),
                size(r),
                m.mux.kind.name(),
                m.demux.kind.name(),
                m.n_instances,
                r.warmup.enabled,
            ))
        })
        .cloned()
        .collect();
    let model = |r: &RunConfig| (r.data.dataset.clone(), r.model.backbone.clone(), size(r));
    let with_base: std::collections::BTreeSet<_> = points
        .iter()
        .filter(|r| r.model.n_instances == 1)
        .map(model)
        .collect();
    let mut based = std::collections::BTreeSet::new();
    let bases: Vec<RunConfig> = points
        .iter()
        .filter(|r| !with_base.contains(&model(r)) && based.insert(model(r)))
        .map(|r| {
            let mut base = r.clone();
            base.model.n_instances = 1;
            base.warmup.from_n = None;
            base.warmup_source = None;
            base
        })
        .collect();
    points.extend(bases);
    points
}

/// Parse an experiment's text; an error says where: `file:line:column` in the user's own file
/// (`at_lines`), the table and the line's text in both cases (a merged profile's line numbers
/// are not the file's).
fn parse_wire(text: &str, shown: &str, at_lines: bool) -> Result<WireExperiment> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return anyhow::anyhow!("{shown}: {message}");
        };
        let start = span.start.min(text.len());
        let line_no = text[..start].matches('\n').count() + 1;
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..start].chars().count() + 1;
        let line = text[line_start..].lines().next().unwrap_or("").trim();
        // The table the line is in, for a line such as `dropout = 1.5`.
        let table = text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .filter(|_| !line.starts_with('['))
            .map(|t| format!("{t} "))
            .unwrap_or_default();
        if at_lines {
            anyhow::anyhow!("{shown}:{line_no}:{column}: {table}`{line}`: {message}")
        } else {
            anyhow::anyhow!("{shown}: {table}`{line}`: {message}")
        }
    })
}

/// Every `[model]` table and backbone name of a file, against its modality.
fn check_wire(
    wire: &WireExperiment,
    shown: &str,
) -> Result<&'static dyn datamux_pipeline::Modality> {
    let m = registry::modality(&wire.modality).with_context(|| shown.to_string())?;
    let models = std::iter::once(&wire.model)
        .chain(wire.variant.iter().filter_map(|v| v.model.as_ref()))
        .chain(wire.profile.values().filter_map(|p| p.model.as_ref()))
        .chain(
            wire.profile
                .values()
                .flat_map(|p| p.variant.iter().flatten())
                .filter_map(|v| v.model.as_ref()),
        );
    for model in models {
        validate::check_model(model, m).with_context(|| shown.to_string())?;
    }
    let backbones = wire
        .sweep
        .backbone
        .iter()
        .chain(wire.variant.iter().flat_map(|v| &v.when.backbone))
        .chain(wire.expect.iter().filter_map(|e| e.backbone.as_ref()));
    for b in backbones {
        validate::check_backbone(b, m, shown)?;
    }
    if !m.has_warmup() && !wire.sweep.warmup.is_empty() {
        bail!(
            "{shown}: sweep.warmup is set, but the {} modality has no warm-up stage",
            m.name()
        );
    }
    Ok(m)
}

/// Read, check and expand one experiment file under a profile, with `--set` overrides; datasets
/// are looked up in `catalogue`.
pub fn load(
    path: &Path,
    profile: &str,
    overrides: &[(String, toml::Value)],
    catalogue: &Catalogue,
) -> Result<Experiment> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.display().to_string();
    // The typed check of the whole file: unknown keys and wrong types with line and column.
    let wire = parse_wire(&text, &shown, true)?;
    check_wire(&wire, &shown)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    ensure!(
        wire.name == stem,
        "{shown}: name `{}` must equal the file stem `{stem}`",
        wire.name
    );
    let mut raw: toml::Value =
        toml::from_str(&text).with_context(|| format!("{shown}: not TOML"))?;
    let profiles = raw.as_table_mut().and_then(|t| t.remove("profile"));
    // Precedence, lowest first: the file, its [[variant]]s, the profile, the profile's own
    // [[variant]]s, the --set overrides. The profile and the overrides become catch-all variants
    // after the file's, and are also merged over the file so that they can change the sweep.
    let mut late: Vec<toml::Value> = Vec::new();
    if let Some(p) = profiles.as_ref().and_then(|p| p.get(profile)) {
        let mut p = p.clone();
        let extra = p.as_table_mut().and_then(|t| t.remove("variant"));
        merge(&mut raw, &p);
        late.push(catch_all(&p));
        if let Some(toml::Value::Array(extra)) = extra {
            late.extend(extra);
        }
    } else if !["default", "quick", "standard", "paper", "smoke"].contains(&profile) {
        // The standard profiles may be absent (the file's own settings apply); any other
        // name must exist, so a misspelt --profile fails.
        let known: Vec<String> = profiles
            .as_ref()
            .and_then(|p| p.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        bail!(
            "{shown}: no profile `{profile}`; it has: {}",
            known.join(", ")
        );
    }
    let mut set = toml::Value::Table(toml::Table::new());
    for (k, v) in overrides {
        set_dotted(&mut raw, k, v.clone())?;
        set_dotted(&mut set, k, v.clone())?;
    }
    late.push(catch_all(&set));
    if let Some(t) = raw.as_table_mut() {
        match t
            .entry("variant")
            .or_insert_with(|| toml::Value::Array(Vec::new()))
        {
            toml::Value::Array(a) => a.extend(late),
            other => bail!("{shown}: `variant` must be an array of tables, not {other}"),
        }
    }
    // Re-check after merging, so overrides are held to the same schema.
    let merged_text = toml::to_string(&raw)?;
    let wire = parse_wire(
        &merged_text,
        &format!("{shown} (profile {profile}, overrides)"),
        false,
    )?;
    let modality = check_wire(&wire, &format!("{shown} (profile {profile}, overrides)"))?;
    let table = raw.as_table_mut().context("experiment is not a table")?;
    let variants: Vec<toml::Value> = match table.remove("variant") {
        Some(toml::Value::Array(a)) => a,
        _ => Vec::new(),
    };
    for k in ["sweep", "expect", "name", "analysis", "modality", "compare"] {
        table.remove(k);
    }
    let sweep = &wire.sweep;
    let or = |list: &[String], one: Option<&toml::Value>| -> Vec<String> {
        if list.is_empty() {
            vec![one.and_then(|v| v.as_str()).unwrap_or_default().to_string()]
        } else {
            list.to_vec()
        }
    };
    let model_keys: wire::WireModelKeys = {
        let mut keys = wire.model.clone();
        keys.retain(|k, _| wire::MODEL_KEYS.contains(&k));
        toml::Value::Table(keys).try_into()?
    };
    let ns = if sweep.n_instances.is_empty() {
        vec![model_keys.n_instances.unwrap_or(1)]
    } else {
        sweep.n_instances.clone()
    };
    let backbones = or(&sweep.backbone, wire.model.get("backbone"));
    let muxes = if sweep.mux.is_empty() {
        vec![model_keys.mux.kind]
    } else {
        sweep.mux.clone()
    };
    let demuxes = if sweep.demux.is_empty() {
        vec![model_keys.demux.kind]
    } else {
        sweep.demux.clone()
    };
    let warmups = if sweep.warmup.is_empty() {
        vec![wire.warmup.enabled]
    } else {
        sweep.warmup.clone()
    };
    let datasets = if sweep.dataset.is_empty() {
        vec![wire.data.dataset.clone()]
    } else {
        sweep.dataset.clone()
    };
    let resolver = Resolver {
        raw: &raw,
        variants: &variants,
        wire: &wire,
        modality,
        catalogue,
        shown: shown.clone(),
    };
    let mut runs = Vec::new();
    for dataset in &datasets {
        for backbone in &backbones {
            for &mux in &muxes {
                for &demux in &demuxes {
                    for &n in &ns {
                        for &warmup in &warmups {
                            for &seed in &sweep.seeds {
                                // B1 / B2 are N = 1 baselines; a muxed run always warms up.
                                if modality.has_warmup() && !warmup && n > 1 {
                                    continue;
                                }
                                let point = RunPoint {
                                    dataset: dataset.clone(),
                                    n,
                                    backbone: backbone.clone(),
                                    mux,
                                    demux,
                                    seed,
                                    warmup,
                                };
                                runs.extend(resolver.run(&point)?);
                            }
                        }
                    }
                }
            }
        }
    }
    ensure!(
        !sweep.seeds.is_empty(),
        "{shown}: sweep.seeds is empty: the experiment would plan no run"
    );
    for e in &wire.expect {
        validate::check_expect(e).with_context(|| format!("{shown}: [[expect]]"))?;
    }
    let mut ids = std::collections::BTreeSet::new();
    for r in &runs {
        ensure!(
            ids.insert(r.run_id()),
            "{shown}: two runs resolve to the same settings ({})",
            r.run_id()
        );
    }
    let speed = speed_points(modality, &runs);
    Ok(Experiment {
        name: wire.name,
        path: path.to_path_buf(),
        profile: profile.to_string(),
        analysis: wire.analysis.unwrap_or_default(),
        compare: wire.compare,
        modality: modality.name(),
        runs,
        speed,
        expect: wire.expect,
    })
}
