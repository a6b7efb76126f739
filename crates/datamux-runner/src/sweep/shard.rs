//! `datamux run --shard K/M`: a stable share of the grid, for running it on several machines.
//! Runs that share a warm-up (the curriculum's chain of warm-ups over N included) form one
//! group, and a group goes whole to the shard its smallest run id hashes to: a shard never waits
//! on, or retrains, another shard's warm-up, and a rerun of a shard plans the same runs (a resume).
//! `datamux merge` puts the shards' folders back together.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use crate::config::{Experiment, RunConfig};
use crate::job::Job;

/// Shard `index` of `count` (1-based on the command line: `--shard 2/3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parsed = s
            .split_once('/')
            .and_then(|(k, m)| Some((k.trim().parse().ok()?, m.trim().parse().ok()?)));
        match parsed {
            Some((k, m)) if m >= 1 && (1..=m).contains(&k) => Ok(Self {
                index: k - 1,
                count: m,
            }),
            _ => bail!("--shard takes K/M with 1 <= K <= M (e.g. 2/3), got `{s}`"),
        }
    }
}

/// FNV-1a, 64 bits: a hash that no Rust release or platform changes (std's `DefaultHasher`
/// may), so a shard plans the same runs on every machine.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The group of every run: the smallest run id among the runs it is connected to through
/// shared warm-ups (union-find over warm-up names), across every experiment of the plan.
fn groups(runs: &[&RunConfig]) -> BTreeMap<String, String> {
    let ids: Vec<String> = runs.iter().map(|r| r.run_id()).collect();
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_user: BTreeMap<String, usize> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        for w in Job::Train((*r).clone()).warmups() {
            match first_user.get(&w) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    // The smaller id is the root, so the group's name is its smallest run id.
                    if ids[a] < ids[b] {
                        parent[b] = a;
                    } else {
                        parent[a] = b;
                    }
                }
                None => {
                    first_user.insert(w, i);
                }
            }
        }
    }
    (0..runs.len())
        .map(|i| {
            let r = root(&mut parent, i);
            (ids[i].clone(), ids[r].clone())
        })
        .collect()
}

/// Keep in each experiment only the runs of `shard`. Expectations are about the whole grid, so
/// a shard checks none (check them on the merged folder: a `datamux run` there trains nothing).
pub fn restrict(experiments: &mut [Experiment], shard: Shard) {
    let all: Vec<&RunConfig> = experiments.iter().flat_map(|e| &e.runs).collect();
    let group = groups(&all);
    let mine = |r: &RunConfig| {
        let id = r.run_id();
        let g = group.get(&id).unwrap_or(&id);
        stable_hash(g) % shard.count as u64 == shard.index as u64
    };
    for e in experiments {
        e.runs.retain(|r| mine(r));
        // A speed point depends on nothing: it goes by its own id, planned on the whole grid
        // (so that the shards time what one machine would, once).
        e.speed
            .retain(|r| stable_hash(&r.run_id()) % shard.count as u64 == shard.index as u64);
        e.expect.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    #[test]
    fn shards_split_the_grid_and_keep_warm_up_chains_together() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/text-sentence.toml");
        let catalogue = datamux_data::Catalogue::builtin().unwrap();
        let load = || vec![config::load(&path, "standard", &[], &catalogue).unwrap()];
        let everything: Vec<String> = load()[0].runs.iter().map(|r| r.run_id()).collect();
        let mut seen: Vec<String> = Vec::new();
        let mut owner: BTreeMap<String, usize> = BTreeMap::new();
        for k in 0..3 {
            let mut exps = load();
            restrict(&mut exps, Shard { index: k, count: 3 });
            assert!(exps[0].expect.is_empty());
            for r in &exps[0].runs {
                for w in Job::Train(r.clone()).warmups() {
                    // A warm-up (and so its whole curriculum chain) belongs to one shard.
                    assert_eq!(*owner.entry(w).or_insert(k), k, "{}", r.run_id());
                }
                seen.push(r.run_id());
            }
            // The same shard plans the same runs again (a rerun resumes).
            let mut again = load();
            restrict(&mut again, Shard { index: k, count: 3 });
            assert_eq!(again[0].runs.len(), exps[0].runs.len());
        }
        seen.sort();
        let mut all = everything.clone();
        all.sort();
        assert_eq!(seen, all, "every run in exactly one shard");

        assert_eq!(
            "2/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
        for bad in ["0/3", "4/3", "1/0", "x", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
