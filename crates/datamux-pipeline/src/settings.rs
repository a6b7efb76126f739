//! The resolved settings of one run, the same for every modality: data, model (the
//! multiplexing settings, the backbone's name and the modality's own `[model.<section>]` tables),
//! training, the warm-up stage, timing. The runner expands experiment files into these; a
//! modality reads its sections typed ([`Sections::get`]).
//!
//! A run's id hashes its settings as JSON. A section is kept as the JSON its modality's typed
//! settings serialise to (field order and `f32` digits included), so that the hash of a run does
//! not depend on how its sections travelled (a TOML merge, a worker's spec file).

use anyhow::{Context as _, Result};
use datamux_core::{demux, mux};
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A catalogue name (`datamux-data/catalogue.toml`, or the data directory's own).
    pub dataset: String,
    /// Examples held out of `train` (a seeded choice) when the dataset has no validation split.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub validation_holdout: usize,
    /// Use at most this many training examples (0 = all); a seeded subset.
    pub train_limit: usize,
    /// Score at most this many validation examples during training (0 = all); the final
    /// validation and test figures always use the whole split.
    pub eval_limit: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            validation_holdout: 5000, // MNIST's usual 55k / 5k split
            train_limit: 0,
            eval_limit: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps (the budget is counted in steps, never in seconds).
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub steps: usize,
    /// Instances per step; the backbone sees `batch_size / N` rows.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub batch_size: usize,
    #[serde(deserialize_with = "datamux_core::range::positive")]
    pub lr: f64,
    #[serde(deserialize_with = "datamux_core::range::non_negative")]
    pub weight_decay: f64,
    /// Linear warm-up of the learning rate, then linear decay to 0 at `steps`.
    pub lr_warmup_steps: usize,
    #[serde(deserialize_with = "datamux_core::range::positive")]
    pub max_grad_norm: f64,
    /// Validate every this many steps (and at the end); the best validation checkpoint is kept.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub eval_every: usize,
    /// Muxed rows per evaluation batch.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub eval_rows: usize,
    /// `(α_task, α_ret)` of the loss; the retrieval term applies to text only.
    #[serde(deserialize_with = "datamux_core::range::non_negative")]
    pub task_weight: f64,
    #[serde(deserialize_with = "datamux_core::range::non_negative")]
    pub retrieval_weight: f64,
    /// Soft targets from the sweep's finished N = 1 run of the same settings, at N > 1. Off,
    /// the default, is left out of the settings, so earlier runs keep their hashes.
    #[serde(skip_serializing_if = "DistillConfig::is_off")]
    pub distill: DistillConfig,
}

/// `train.distill = { weight = 0.5, temperature = 2.0, init = true }`: the loss is
/// `(1 − weight)·task + weight·T²·KL(teacher ‖ student)` at temperature `T`
/// (`datamux_core::task::distilled`); `init` starts the student from the teacher's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// In [0, 1]; 0 is no distillation.
    #[serde(deserialize_with = "datamux_core::range::probability")]
    pub weight: f64,
    #[serde(deserialize_with = "datamux_core::range::positive")]
    pub temperature: f64,
    /// Start the student from its teacher: every parameter of the same name and shape is
    /// copied (the stem, trunk and head); the per-slot ones (mux and demux keys) keep their
    /// fresh values. Usable with `weight = 0` (a warm start alone). Off is left out of the
    /// settings, so earlier runs keep their hashes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            weight: 0.0,      // off
            temperature: 2.0, // a common choice for 10 classes (Hinton et al. 2015 use 1-20)
            init: false,
        }
    }
}

impl DistillConfig {
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the loss has the soft-target term.
    pub fn enabled(&self) -> bool {
        self.weight > 0.0
    }

    /// Whether the run needs its N = 1 teacher: for soft targets or a warm start.
    pub fn needs_teacher(&self) -> bool {
        self.enabled() || self.init
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 0.0,  // the reference's AdamW default (method.md §10)
            lr_warmup_steps: 0, // the reference decays linearly without warm-up
            max_grad_norm: 1.0, // the reference's clipping
            eval_every: 500,
            eval_rows: 64,
            task_weight: 0.9,      // the DataMUX fine-tuning weights
            retrieval_weight: 0.1, // (method.md §5)
            distill: DistillConfig::default(),
        }
    }
}

/// The warm-up stage a modality may train before the task (text: the retrieval warm-up,
/// method.md §5). A modality without one leaves this at its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Run the warm-up before fine-tuning (B2 and every muxed run); false gives B1 at N = 1.
    pub enabled: bool,
    /// `task` (the task's own training data) or a catalogue corpus such as `wikitext-103`.
    pub corpus: String,
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub steps: usize,
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub batch_size: usize,
    #[serde(deserialize_with = "datamux_core::range::positive")]
    pub lr: f64,
    pub lr_warmup_steps: usize,
    /// Every dropout of the warm-up model (embeddings, encoder, demultiplexer); unset keeps the
    /// model's. Retrieval has a target at every position, so it needs less regularising than
    /// the task: at N = 5 no dropout gave 57.7 % retrieval after 1000 steps against 54.3 %
    /// (docs/text-recipe.md). Left out of the serialised settings when unset, so the hashes of
    /// runs that do not use it stay as they were.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "datamux_core::range::opt_probability"
    )]
    pub dropout: Option<f64>,
    /// Start the warm-up from the finished warm-up of the same run at this smaller N (a
    /// curriculum over N; the `index` demultiplexer only): every parameter is copied, the prefix
    /// table grown (`datamux_core::demux::grow_index_table`). Gaussian keys of the first M slots
    /// are the same at M and N (one seeded stream), so slots 0..M start already addressable. At
    /// N = 10, from N = 5, retrieval on validation was 43.4 % after 600 steps against 19.0 % from
    /// scratch (docs/text-recipe.md). Left out of the serialised settings when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_n: Option<usize>,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            corpus: "task".into(), // the issue's default: the task's own training text
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            lr_warmup_steps: 0,
            dropout: None,
            from_n: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeedConfig {
    pub enabled: bool,
    /// Instances per timed pass; the same at every N (rounded up to a multiple of N).
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub batch_instances: usize,
    /// Muxed rows per forward call: a pass is `batch_instances / (rows_per_call · N)` calls of
    /// the same shape at every N, as the reference times a fixed batch of muxed rows
    /// (method.md §9.2). Unset: the whole pass in one call.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "datamux_core::range::opt_at_least_one"
    )]
    pub rows_per_call: Option<usize>,
    pub warmup_iters: usize,
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub iters: usize,
    /// Stop measuring after this long even if `iters` is not reached.
    #[serde(deserialize_with = "datamux_core::range::positive")]
    pub max_seconds: f64,
}

impl Default for SpeedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_instances: 160,
            rows_per_call: None, // one call per pass, as the committed tables were timed
            warmup_iters: 2,
            iters: 10,
            max_seconds: 30.0,
        }
    }
}

/// The `[model.<name>]` tables of a run, in the order the runner lays them out, each kept as the
/// JSON text its modality's typed settings serialise to.
#[derive(Debug, Clone, Default)]
pub struct Sections(Vec<(String, Box<RawValue>)>);

impl PartialEq for Sections {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.get() == y.get())
    }
}

impl Sections {
    /// Section `name` as its typed settings.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let raw = self
            .raw(name)
            .with_context(|| format!("the run has no `model.{name}` settings"))?;
        serde_json::from_str(raw).with_context(|| format!("`model.{name}` does not parse"))
    }

    /// Set section `name` (replacing it in place, or appending it).
    pub fn set<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let raw = RawValue::from_string(serde_json::to_string(value)?)?;
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, slot)) => *slot = raw,
            None => self.0.push((name.to_string(), raw)),
        }
        Ok(())
    }

    /// The JSON text of section `name`.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, r)| r.get())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }
}

/// Typed settings of a section from its merged TOML table, as the JSON text [`Sections`] keeps:
/// every default filled in, an unknown key an error.
pub fn section_json<T: DeserializeOwned + Serialize>(value: &toml::Value) -> Result<Box<RawValue>> {
    let typed: T = value.clone().try_into()?;
    Ok(RawValue::from_string(serde_json::to_string(&typed)?)?)
}

/// The model of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// A backbone name of the run's modality (`lenet`, `vit`, `transformer`, ...); the modality
    /// parses it into its own type.
    pub backbone: String,
    pub n_instances: usize,
    pub mux: mux::Config,
    pub demux: demux::Config,
    pub sections: Sections,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backbone: String::new(),
            n_instances: 1,
            mux: mux::Config::default(),
            demux: demux::Config::default(),
            sections: Sections::default(),
        }
    }
}

/// `{"backbone", "n_instances", "mux", "demux", <sections in order>}`: the layout whose hash the
/// run ids of the published tables are.
impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(4 + self.sections.0.len()))?;
        map.serialize_entry("backbone", &self.backbone)?;
        map.serialize_entry("n_instances", &self.n_instances)?;
        map.serialize_entry("mux", &self.mux)?;
        map.serialize_entry("demux", &self.demux)?;
        for (name, raw) in &self.sections.0 {
            map.serialize_entry(name, raw)?;
        }
        map.end()
    }
}

/// Read back from JSON (a worker's spec): every key but the four fixed ones is a section, kept
/// verbatim. Only JSON carries sections; the runner builds them from TOML itself.
impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a model table")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = ModelConfig::default();
                while let Some(key) = m.next_key::<String>()? {
                    match key.as_str() {
                        "backbone" => out.backbone = m.next_value()?,
                        "n_instances" => out.n_instances = m.next_value()?,
                        "mux" => out.mux = m.next_value()?,
                        "demux" => out.demux = m.next_value()?,
                        _ => {
                            let raw: Box<RawValue> = m.next_value()?;
                            out.sections.0.push((key, raw));
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// The resolved settings of one run: everything that determines its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub experiment: String,
    /// The modality that runs it (`vision`, `text`, ...).
    pub modality: String,
    pub seed: u64,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub warmup: WarmupConfig,
    #[serde(default)]
    pub speed: SpeedConfig,
    /// The resolved run at `warmup.from_n` whose warm-up this one starts from (set by the
    /// runner, never written in an experiment file). Part of the hash: a changed source is a
    /// new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_source: Option<Box<RunConfig>>,
    /// The resolved N = 1 run whose checkpoint teaches this one (`train.distill`; set by the
    /// runner). Part of the hash, as `warmup_source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<Box<RunConfig>>,
}

impl RunConfig {
    /// A stable hash of the resolved settings (FNV-1a over canonical JSON), so a changed setting
    /// is a new run and an unchanged one is never recomputed.
    pub fn config_hash(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{:016x}", datamux_core::init::name_seed(0, &json))
    }

    /// `<dataset>-<backbone>-<mux>-<demux>-n<N>-s<seed>[-nowarm]-<hash>`; `-nowarm` marks a
    /// run of a modality with a warm-up stage that skips it (B1).
    pub fn run_id(&self) -> String {
        let m = &self.model;
        let warm = if self.warmup.enabled { "" } else { "-nowarm" };
        format!(
            "{}-{}-{}-{}-n{}-s{}{}-{}",
            self.data.dataset,
            m.backbone,
            m.mux.kind.name(),
            m.demux.kind.name(),
            m.n_instances,
            self.seed,
            warm,
            &self.config_hash()[..8]
        )
    }

    /// The multiplexing settings for `MuxNet`.
    pub fn mux_config(&self) -> datamux_core::model::Config {
        datamux_core::model::Config {
            n_instances: self.model.n_instances,
            mux: self.model.mux.clone(),
            demux: self.model.demux.clone(),
        }
    }

    /// The settings as TOML (`resolved.toml`): through JSON, so the sections come out as their
    /// typed settings wrote them. TOML has no null, so unset options are left out.
    pub fn to_toml(&self) -> Result<toml::Value> {
        fn strip_nulls(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.retain(|_, x| !x.is_null());
                    m.values_mut().for_each(strip_nulls);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
                _ => {}
            }
        }
        let mut json = serde_json::to_value(self)?;
        strip_nulls(&mut json);
        Ok(toml::Value::try_from(json)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Part {
        size: usize,
        mean: Vec<f32>,
        name: Option<String>,
    }

    fn run() -> RunConfig {
        let mut model = ModelConfig::default();
        let part = toml::Value::Table(toml::toml! { mean = [0.1307] size = 3 });
        model.sections.0.push((
            "part".into(),
            section_json::<Part>(&part).unwrap_or_else(|e| panic!("{e}")),
        ));
        RunConfig {
            experiment: "e".into(),
            modality: "vision".into(),
            seed: 0,
            data: DataConfig::default(),
            model,
            train: TrainConfig::default(),
            warmup: WarmupConfig::default(),
            speed: SpeedConfig::default(),
            warmup_source: None,
            teacher: None,
        }
    }

    #[test]
    fn sections_keep_their_typed_json_through_a_spec_file() {
        let r = run();
        // Field order and f32 digits are the typed struct's, not a sorted f64 map's.
        assert_eq!(
            r.model.sections.raw("part"),
            Some(r#"{"size":3,"mean":[0.1307],"name":null}"#)
        );
        let json = serde_json::to_string(&r).unwrap_or_default();
        assert!(
            json.contains(r#""demux":{"kind":"index","dropout":0.1,"layer_norm_eps":0.00001},"part":{"size":3"#),
            "{json}"
        );
        let back: RunConfig = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
        assert_eq!(back.run_id(), r.run_id());
        let part: Part = back
            .model
            .sections
            .get("part")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((part.size, part.mean[0]), (3, 0.1307));
        // TOML has no null: the unset option is left out.
        let toml = r.to_toml().unwrap_or_else(|e| panic!("{e}"));
        assert!(toml["model"]["part"].get("name").is_none());
        assert_eq!(toml["model"]["part"]["size"].as_integer(), Some(3));
    }

    #[test]
    fn a_misspelt_section_key_is_an_error_naming_it() {
        let bad = toml::Value::Table(toml::toml! { sise = 3 });
        let e = section_json::<Part>(&bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("sise"), "{e}");
    }

    #[test]
    fn the_id_marks_a_skipped_warm_up_and_moves_with_any_setting() {
        let mut r = run();
        let id = r.run_id();
        assert!(id.contains("-n1-s0-") && !id.contains("nowarm"), "{id}");
        r.warmup.enabled = false;
        assert!(r.run_id().contains("-nowarm-"));
        r.warmup.enabled = true;
        r.model
            .sections
            .set(
                "part",
                &Part {
                    size: 4,
                    ..Part::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(r.run_id(), id);
    }
}
