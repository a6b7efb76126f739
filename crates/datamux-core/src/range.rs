//! Range checks of numeric settings, as serde `deserialize_with` functions: a value out of range
//! fails while the experiment file is parsed, so the error carries the file, line and column.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// A count that must be at least 1 (steps, batch sizes, iterations).
pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(D::Error::custom("must be at least 1, got 0"));
    }
    Ok(v)
}

/// [`at_least_one`] where the setting may be left out.
pub fn opt_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<usize>::deserialize(d)? {
        Some(0) => Err(D::Error::custom("must be at least 1, got 0")),
        v => Ok(v),
    }
}

fn finite<E: serde::de::Error>(v: f64) -> Result<f64, E> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(E::custom(format!("must be a finite number, got {v}")))
    }
}

/// A finite number above 0 (learning rates, clipping norms, seconds).
pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = finite(f64::deserialize(d)?)?;
    if v <= 0.0 {
        return Err(D::Error::custom(format!("must be above 0, got {v}")));
    }
    Ok(v)
}

/// A finite number of at least 0 (weights of a loss, weight decay, epsilons).
pub fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = finite(f64::deserialize(d)?)?;
    if v < 0.0 {
        return Err(D::Error::custom(format!("must be at least 0, got {v}")));
    }
    Ok(v)
}

fn check_probability<E: serde::de::Error>(v: f64) -> Result<f64, E> {
    if !(0.0..1.0).contains(&v) {
        return Err(E::custom(format!(
            "is a dropout probability, in [0, 1); got {v}"
        )));
    }
    Ok(v)
}

/// A dropout probability, in [0, 1).
pub fn probability<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check_probability(f64::deserialize(d)?)
}

/// [`probability`] where the setting may be left out.
pub fn opt_probability<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)?
        .map(check_probability)
        .transpose()
}

/// Finite numbers (per-channel means).
pub fn finite_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v = Vec::<f32>::deserialize(d)?;
    if let Some(x) = v.iter().find(|x| !x.is_finite()) {
        return Err(D::Error::custom(format!("must be finite numbers, got {x}")));
    }
    Ok(v)
}

/// Finite numbers above 0 (per-channel standard deviations, which divide).
pub fn positive_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v = finite_list(d)?;
    if let Some(x) = v.iter().find(|x| **x <= 0.0) {
        return Err(D::Error::custom(format!("must be above 0, got {x}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct S {
        #[serde(deserialize_with = "super::at_least_one", default = "one")]
        n: usize,
        #[serde(deserialize_with = "super::probability", default)]
        p: f64,
        #[serde(deserialize_with = "super::positive_list", default)]
        std: Vec<f32>,
    }

    fn one() -> usize {
        1
    }

    fn parse(s: &str) -> Result<S, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn out_of_range_values_fail_with_the_rule() {
        assert!(parse(r#"{"n": 3, "p": 0.5, "std": [0.3]}"#).is_ok());
        assert!(parse(r#"{"n": 0}"#).unwrap_err().contains("at least 1"));
        assert!(parse(r#"{"p": 1.5}"#).unwrap_err().contains("[0, 1)"));
        assert!(parse(r#"{"p": -0.1}"#).unwrap_err().contains("[0, 1)"));
        assert!(parse(r#"{"std": [0.0]}"#).unwrap_err().contains("above 0"));
        // Left out: the default, unchecked.
        assert_eq!(parse("{}").unwrap().n, 1);
    }
}
