//! The one place where the runner picks a modality: every modality crate's [`Modality`], by the
//! name experiment files give in `modality = "..."`. A new modality is one line in
//! [`MODALITIES`] (docs/extending.md).

use anyhow::{Result, bail};
use datamux_pipeline::Modality;

/// Every modality the runner can run, one a line.
#[rustfmt::skip]
pub static MODALITIES: &[&dyn Modality] = &[
    &datamux_vision::Vision,
    &datamux_text::Text,
    &datamux_audio::Audio,
];

/// The modality named `name`.
pub fn modality(name: &str) -> Result<&'static dyn Modality> {
    match MODALITIES.iter().find(|m| m.name() == name) {
        Some(m) => Ok(*m),
        None => bail!(
            "unknown modality `{name}`; expected {}",
            MODALITIES
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The modality whose `[model.<section>]` table `section` is.
pub fn owner(section: &str) -> Option<&'static dyn Modality> {
    MODALITIES
        .iter()
        .find(|m| m.sections().contains(&section))
        .copied()
}

/// Runs of the modalities that predate modality pipelines carry all of these sections, in this
/// order, whichever of the two they are: the published tables are keyed by run ids hashed over
/// that layout. A modality added since carries its own sections only.
const BEFORE_PIPELINES: [&str; 2] = ["vision", "text"];
const SHARED_SECTIONS: [&str; 5] = ["image", "mlp", "cnn", "vit", "text"];

/// The sections a run of `m` carries in its settings, in order, with the modality that owns
/// each (which fills in its defaults).
pub fn layout(m: &dyn Modality) -> Vec<(&'static str, &'static dyn Modality)> {
    let names: Vec<&'static str> = if BEFORE_PIPELINES.contains(&m.name()) {
        SHARED_SECTIONS.to_vec()
    } else {
        m.sections().to_vec()
    };
    names
        .into_iter()
        .filter_map(|s| owner(s).map(|o| (s, o)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sections_are_unique_and_every_shared_section_has_an_owner() {
        let mut names: Vec<&str> = MODALITIES.iter().map(|m| m.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MODALITIES.len());
        let mut sections: Vec<&str> = MODALITIES
            .iter()
            .flat_map(|m| m.sections())
            .copied()
            .collect();
        let count = sections.len();
        sections.sort_unstable();
        sections.dedup();
        assert_eq!(sections.len(), count, "two modalities claim one section");
        for s in SHARED_SECTIONS {
            assert!(owner(s).is_some(), "{s}");
        }
        for m in MODALITIES {
            let own: Vec<&str> = layout(*m).into_iter().map(|(s, _)| s).collect();
            assert!(m.sections().iter().all(|s| own.contains(s)), "{}", m.name());
        }
        let e = modality("smell")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("vision") && e.contains("text"), "{e}");
    }
}
