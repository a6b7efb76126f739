//! Fixed per-instance keys of the multiplexers, generated on the host from seeded ChaCha streams.
//!
//! Shapes: Gaussian, binary and unitary keys are `(N, D)`, orthogonal keys `(N, D, D)`, all
//! row-major.
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

/// One real unitary vector per instance: every coefficient of its discrete Fourier transform has
/// magnitude 1, with a uniform random phase (conjugate-symmetric, so the vector is real; the
/// phases of frequency 0 and, for even `D`, `D / 2` are 0 or π). Circular convolution with such
/// a key is an orthogonal map and circular correlation with it inverts the convolution exactly,
/// the holographic reduced representation's binding with an exact unbinding (MIMONets,
/// arXiv 2312.02829, §3). L2 norm 1 (Parseval).
pub fn unitary(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    use rand::Rng;
    let tau = std::f64::consts::TAU;
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        // Phases of frequencies 0..=D/2; the rest are their negatives.
        let phases: Vec<f64> = (0..=d / 2)
            .map(|f| {
                let edge = f == 0 || 2 * f == d;
                if edge {
                    if rng.random::<bool>() {
                        std::f64::consts::PI
                    } else {
                        0.0
                    }
                } else {
                    rng.random::<f64>() * tau
                }
            })
            .collect();
        for t in 0..d {
            // k[t] = (1/D) Σ_f e^{i(φ_f + 2π f t / D)}, the pairs (f, D - f) summed as 2 cos.
            let v: f64 = phases
                .iter()
                .enumerate()
                .map(|(f, &p)| {
                    let c = (p + tau * (f * t) as f64 / d as f64).cos();
                    if f == 0 || 2 * f == d { c } else { 2.0 * c }
                })
                .sum();
            out.push((v / d as f64) as f32);
        }
    }
    out
}

/// Flat gather indices of the circulant matrices of `(N, D)` keys: `idx[a·D + b] = (a - b) mod
/// D`, so that `keys.index_select(idx, 1).reshape((N, D, D))` holds `C(kᵢ)[a][b] = kᵢ[(a - b) mod
/// D]` and `C(kᵢ) x = kᵢ ⊛ x`, the circular convolution.
pub fn circulant_index(d: usize) -> Vec<u32> {
    (0..d)
        .flat_map(|a| (0..d).map(move |b| ((a + d - b) % d) as u32))
        .collect()
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

    /// `(k ⊛ x)[a] = Σ_b k[(a - b) mod D] x[b]`, written out.
    fn circular_conv(k: &[f32], x: &[f32]) -> Vec<f64> {
        let d = k.len();
        (0..d)
            .map(|a| {
                (0..d)
                    .map(|b| f64::from(k[(a + d - b) % d]) * f64::from(x[b]))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn unitary_keys_bind_orthogonally_at_odd_and_even_widths() {
        for d in [7, 10] {
            let keys = unitary(3, d, &mut rng_for(2, "u"));
            for k in keys.chunks(d) {
                let len: f64 = k.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                assert!((len - 1.0).abs() < 1e-5, "D = {d}: norm {len}");
                // Orthogonal binding keeps every vector's norm, here each unit vector's.
                for j in 0..d {
                    let mut e = vec![0f32; d];
                    e[j] = 1.0;
                    let y = circular_conv(k, &e);
                    let n: f64 = y.iter().map(|v| v * v).sum::<f64>().sqrt();
                    assert!((n - 1.0).abs() < 1e-5);
                }
                // The autocorrelation of a unitary key is the unit impulse: unbinding is exact.
                for s in 0..d {
                    let r: f64 = (0..d)
                        .map(|b| f64::from(k[b]) * f64::from(k[(b + s) % d]))
                        .sum();
                    let want = if s == 0 { 1.0 } else { 0.0 };
                    assert!((r - want).abs() < 1e-5, "D = {d}, shift {s}: {r}");
                }
            }
        }
    }

    #[test]
    fn circulant_index_is_circular_convolution() {
        let d = 5;
        let k: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        let x = [0.5f32, -1.0, 2.0, 0.0, 3.0];
        let idx = circulant_index(d);
        let got: Vec<f64> = (0..d)
            .map(|a| {
                (0..d)
                    .map(|b| f64::from(k[idx[a * d + b] as usize]) * f64::from(x[b]))
                    .sum()
            })
            .collect();
        assert_eq!(got, circular_conv(&k, &x));
    }
}
