//! The train, validation and test splits of a run. Without a test split the validation split is
//! reported (as the paper does for GLUE) and model selection uses a holdout of train instead, so
//! no figure is selected on the split it reports.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::DataError;
use crate::examples::Split;

/// The three splits a run trains, selects and reports on.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Split,
    pub valid: Split,
    pub test: Split,
}

/// How a run cuts its data: `holdout` training examples become the validation split when the
/// dataset has none (at most a fifth of train), and at most `limit` training examples are used
/// (0 = all). Both choices are seeded streams of the caller's, the same for every run of an
/// experiment, so every run sees the same data.
pub struct Cut {
    pub holdout: usize,
    pub limit: usize,
    pub holdout_rng: ChaCha8Rng,
    pub limit_rng: ChaCha8Rng,
}

impl Splits {
    /// The splits of a run from the ones a dataset has; `dataset` names it in the error when it
    /// has neither a validation nor a test split.
    pub fn assemble(
        dataset: &str,
        train: Split,
        valid: Option<Split>,
        test: Option<Split>,
        cut: Cut,
    ) -> Result<Self, DataError> {
        let Cut {
            holdout,
            limit,
            mut holdout_rng,
            mut limit_rng,
        } = cut;
        match (valid, test) {
            (Some(valid), Some(test)) => Ok(Self {
                train: limited(train, limit, &mut limit_rng),
                valid,
                test,
            }),
            (Some(reported), None) | (None, Some(reported)) => {
                let (train, valid) = held_out(&train, holdout, limit, &mut holdout_rng);
                Ok(Self {
                    train,
                    valid,
                    test: reported,
                })
            }
            (None, None) => Err(DataError::NoEvaluationSplit {
                dataset: dataset.to_string(),
            }),
        }
    }
}

/// `count` seeded training examples (sorted back into file order) as `validation`, and at most
/// `limit` of the rest as train.
fn held_out(split: &Split, count: usize, limit: usize, rng: &mut ChaCha8Rng) -> (Split, Split) {
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.shuffle(rng);
    let count = count.min(split.len() / 5);
    let (held, rest) = order.split_at(count);
    let rest = if limit > 0 {
        &rest[..limit.min(rest.len())]
    } else {
        rest
    };
    let mut sorted_held = held.to_vec();
    sorted_held.sort_unstable();
    let train = split.select(rest);
    let mut valid = split.select(&sorted_held);
    valid.split = "validation".into();
    (train, valid)
}

/// At most `limit` seeded examples (0 = all).
fn limited(split: Split, limit: usize, rng: &mut ChaCha8Rng) -> Split {
    if limit == 0 || limit >= split.len() {
        return split;
    }
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.shuffle(rng);
    split.select(&order[..limit])
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::examples::{Examples, Source};

    fn split(name: &str, labels: Vec<u32>) -> Split {
        let len = labels.len();
        Split {
            dataset: "d".into(),
            split: name.into(),
            source: Source::Local { folder: "d".into() },
            files: vec![format!("{name}.parquet").into()],
            label_names: vec!["a".into()],
            rows: (0..len).map(|r| (0, r)).collect(),
            examples: Examples::Text {
                texts: (0..len).map(|i| i.to_string()).collect(),
                pairs: None,
                labels,
            },
        }
    }

    fn cut(holdout: usize, limit: usize) -> Cut {
        Cut {
            holdout,
            limit,
            holdout_rng: ChaCha8Rng::seed_from_u64(1),
            limit_rng: ChaCha8Rng::seed_from_u64(2),
        }
    }

    #[test]
    fn a_holdout_replaces_a_missing_validation_split_and_keeps_file_rows() {
        let s = Splits::assemble(
            "d",
            split("train", vec![0; 23]),
            None,
            Some(split("test", vec![0; 3])),
            cut(7, 9),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // At most a fifth of train is held out; the rest is limited.
        assert_eq!((s.valid.len(), s.train.len(), s.test.len()), (4, 9, 3));
        assert_eq!(s.valid.split, "validation");
        let Examples::Text { texts, .. } = &s.valid.examples else {
            panic!("kind changed")
        };
        // The held-out examples keep the file order, and each still names its file row.
        let rows: Vec<usize> = texts.iter().map(|t| t.parse().unwrap_or(0)).collect();
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(s.valid.origin(i), format!("train.parquet row {r}"));
        }
    }

    #[test]
    fn both_splits_are_kept_and_a_dataset_without_either_is_an_error() {
        let s = Splits::assemble(
            "d",
            split("train", vec![0; 10]),
            Some(split("validation", vec![0; 2])),
            Some(split("test", vec![0; 3])),
            cut(5, 0),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.train.len(), s.valid.len(), s.test.len()), (10, 2, 3));
        let e = Splits::assemble("d", split("train", vec![0; 10]), None, None, cut(5, 0))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("neither a validation nor a test split"), "{e}");
    }
}
