//! Fixed per-instance keys of the multiplexers, generated on the host from seeded ChaCha streams.
//!
//! Shapes: Gaussian and binary keys are `(N, D)`, orthogonal keys `(N, D, D)`, all row-major.
//! Reference: `princeton-nlp/DataMUX`, `models/utils.py` (`random_encoding`, `binary_encoding`);
//! method.md §3.1.

use rand_chacha::ChaCha8Rng;

use crate::error::ConfigError;
use crate::init::randn_vec;

/// One standard-normal vector per instance, rescaled to L2 norm exactly `norm`.
pub fn gaussian(n: usize, d: usize, norm: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut keys = randn_vec(rng, n * d);
    for row in keys.chunks_mut(d) {
        let len = row
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        // A zero draw has probability zero; guard the division anyway.
        let scale = if len > 0.0 { norm / len } else { 0.0 };
        row.iter_mut()
            .for_each(|v| *v = (f64::from(*v) * scale) as f32);
    }
    keys
}

/// 0/1 masks: `D` split into `N` contiguous chunks of `floor(D / N)` dims, the last chunk taking
/// the remainder. `epsilon` widens every chunk by `floor(epsilon / 2 * floor(D / N))` dims on
/// each side (clipped to `0..D`), so neighbouring instances overlap.
pub fn binary(n: usize, d: usize, epsilon: f64) -> Result<Vec<f32>, ConfigError> {
    if n == 0 {
        return Err(ConfigError::NoInstances { n_instances: n });
    }
    if d < n {
        return Err(ConfigError::TooManyChunks {
            hidden_size: d,
            n_instances: n,
        });
    }
    if !(0.0..1.0).contains(&epsilon) {
        return Err(ConfigError::BadEpsilon { epsilon });
    }
    let chunk = d / n;
    let widen = (epsilon / 2.0 * chunk as f64).floor() as usize;
    let mut keys = vec![0f32; n * d];
    for i in 0..n {
        let start = (i * chunk).saturating_sub(widen);
        let end = if i + 1 == n {
            d
        } else {
            ((i + 1) * chunk + widen).min(d)
        };
        keys[i * d + start..i * d + end]
            .iter_mut()
            .for_each(|v| *v = 1.0);
    }
    Ok(keys)
}

/// One Haar-random orthogonal `D x D` matrix per instance.
///
/// The rows of a standard Gaussian matrix are orthonormalised by Gram-Schmidt with one
/// re-orthogonalisation pass (CGS2, accurate to ~1e-15 in f64). This equals the QR factor of the
/// Gaussian matrix with the signs fixed so that `R` has a positive diagonal, which is exactly the
/// Haar measure (Mezzadri 2007); an unsigned QR would not be.
pub fn orthogonal(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d * d);
    for _ in 0..n {
        let mut q: Vec<f64> = randn_vec(rng, d * d).into_iter().map(f64::from).collect();
        for k in 0..d {
            let (done, rest) = q.split_at_mut(k * d);
            let row = &mut rest[..d];
            for _pass in 0..2 {
                for j in 0..k {
                    let qj = &done[j * d..(j + 1) * d];
                    let dot: f64 = qj.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
                    row.iter_mut().zip(qj).for_each(|(r, a)| *r -= dot * a);
                }
            }
            let len = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter_mut().for_each(|v| *v /= len);
        }
        out.extend(q.into_iter().map(|v| v as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::rng_for;

    #[test]
    fn gaussian_rows_have_the_norm() {
        let keys = gaussian(3, 11, 20.0, &mut rng_for(0, "k"));
        for row in keys.chunks(11) {
            let len: f64 = row
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((len - 20.0).abs() < 1e-4, "norm {len}");
        }
    }

    #[test]
    fn binary_layout_without_overlap() -> Result<(), ConfigError> {
        // D = 11, N = 3: chunks of 3, the last takes 5.
        let keys = binary(3, 11, 0.0)?;
        let rows: Vec<Vec<f32>> = keys.chunks(11).map(|r| r.to_vec()).collect();
        assert_eq!(rows[0], [1., 1., 1., 0., 0., 0., 0., 0., 0., 0., 0.]);
        assert_eq!(rows[1], [0., 0., 0., 1., 1., 1., 0., 0., 0., 0., 0.]);
        assert_eq!(rows[2], [0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1.]);
        Ok(())
    }

    #[test]
    fn binary_overlap_widens_both_sides() -> Result<(), ConfigError> {
        // D = 20, N = 2, chunk 10, epsilon 0.5: widen by floor(0.25 * 10) = 2 on each side.
        let keys = binary(2, 20, 0.5)?;
        let first: usize = keys[..20].iter().map(|v| *v as usize).sum();
        assert_eq!(first, 12); // 0..12
        assert_eq!(keys[11], 1.0);
        assert_eq!(keys[12], 0.0);
        assert_eq!(keys[20 + 7], 0.0);
        assert_eq!(keys[20 + 8], 1.0); // 8..20
        Ok(())
    }

    #[test]
    fn binary_rejects_bad_configs() {
        assert!(matches!(
            binary(5, 4, 0.0),
            Err(ConfigError::TooManyChunks { .. })
        ));
        assert!(matches!(
            binary(2, 4, 1.0),
            Err(ConfigError::BadEpsilon { .. })
        ));
    }

    #[test]
    fn orthogonal_is_orthogonal() {
        let d = 13;
        let q = orthogonal(2, d, &mut rng_for(1, "o"));
        for m in q.chunks(d * d) {
            for i in 0..d {
                for j in 0..d {
                    let dot: f64 = (0..d)
                        .map(|k| f64::from(m[k * d + i]) * f64::from(m[k * d + j]))
                        .sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-5, "QᵀQ[{i},{j}] = {dot}");
                }
            }
        }
    }
}
