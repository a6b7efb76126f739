//! A split's clips as the model reads them: at most `max_frames` frames each, normalised on the
//! host once (so a batch is a copy, not a computation), with their labels.

use crate::config::Normalise;

/// Errors about frame inputs; each names the example.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AudioError {
    #[error("{count} clips but {labels} labels")]
    Count { count: usize, labels: usize },
    #[error("example {row}: {values} values do not make frames of {dim}")]
    Ragged {
        row: usize,
        values: usize,
        dim: usize,
    },
    #[error("example {row}: the clip has no frames")]
    Empty { row: usize },
    #[error("example {row}: label {label} is outside 0..{count}")]
    Label {
        row: usize,
        label: u32,
        count: usize,
    },
}

/// Clips of `dim`-wide frames, frame-major, truncated and normalised; one label each.
#[derive(Debug, Clone)]
pub struct FrameData {
    pub dim: usize,
    pub clips: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
}

impl FrameData {
    /// Keep the first `max_frames` frames of each clip and normalise them; labels must be below
    /// `classes`.
    pub fn new(
        frames: &datamux_data::Frames,
        labels: &[u32],
        classes: usize,
        max_frames: usize,
        normalise: Normalise,
    ) -> Result<Self, AudioError> {
        if frames.values.len() != labels.len() {
            return Err(AudioError::Count {
                count: frames.values.len(),
                labels: labels.len(),
            });
        }
        let dim = frames.dim;
        let mut clips = Vec::with_capacity(labels.len());
        for (row, (clip, &label)) in frames.values.iter().zip(labels).enumerate() {
            if dim == 0 || clip.len() % dim != 0 {
                return Err(AudioError::Ragged {
                    row,
                    values: clip.len(),
                    dim,
                });
            }
            if clip.is_empty() {
                return Err(AudioError::Empty { row });
            }
            if label as usize >= classes {
                return Err(AudioError::Label {
                    row,
                    label,
                    count: classes,
                });
            }
            let kept = &clip[..clip.len().min(max_frames * dim)];
            clips.push(match normalise {
                Normalise::Clip => normalised(kept, dim),
                Normalise::None => kept.to_vec(),
            });
        }
        Ok(Self {
            dim,
            clips,
            labels: labels.to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Frames of clip `i`.
    pub fn frames(&self, i: usize) -> usize {
        self.clips[i].len() / self.dim
    }
}

/// Every coefficient of a `(frames, dim)` clip to mean 0 and variance 1 over its frames. A
/// coefficient that is constant over the clip (a one-frame clip) becomes 0.
fn normalised(clip: &[f32], dim: usize) -> Vec<f32> {
    let frames = clip.len() / dim;
    let mut mean = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    for frame in clip.chunks(dim) {
        for (c, v) in frame.iter().enumerate() {
            mean[c] += f64::from(*v);
            sq[c] += f64::from(*v) * f64::from(*v);
        }
    }
    let inv: Vec<(f64, f64)> = mean
        .iter()
        .zip(&sq)
        .map(|(s, q)| {
            let m = s / frames as f64;
            let var = (q / frames as f64 - m * m).max(0.0);
            // The floor keeps a near-constant coefficient from being blown up to noise.
            (m, 1.0 / var.sqrt().max(1e-3))
        })
        .collect();
    clip.chunks(dim)
        .flat_map(|frame| {
            frame
                .iter()
                .zip(&inv)
                .map(|(v, (m, s))| ((f64::from(*v) - m) * s) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(values: Vec<Vec<f32>>) -> datamux_data::Frames {
        datamux_data::Frames { dim: 2, values }
    }

    #[test]
    fn clips_are_truncated_then_normalised_per_coefficient() {
        // Three frames of (c0, c1); c1 is constant.
        let f = frames(vec![vec![1.0, 5.0, 3.0, 5.0, 5.0, 5.0, 100.0, 7.0]]);
        let d = FrameData::new(&f, &[1], 2, 3, Normalise::Clip).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.frames(0), 3, "the fourth frame is cut");
        let c0: Vec<f32> = d.clips[0].iter().step_by(2).copied().collect();
        let c1: Vec<f32> = d.clips[0].iter().skip(1).step_by(2).copied().collect();
        // c0 = 1, 3, 5: mean 3, std sqrt(8/3).
        let s = (8.0f32 / 3.0).sqrt();
        for (got, want) in c0.iter().zip([-2.0 / s, 0.0, 2.0 / s]) {
            assert!((got - want).abs() < 1e-5, "{c0:?}");
        }
        assert!(c1.iter().all(|v| *v == 0.0), "{c1:?}");
        let raw = FrameData::new(&f, &[1], 2, 9, Normalise::None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.clips[0], f.values[0]);
    }

    #[test]
    fn bad_clips_name_the_example() {
        let e = |f, l: &[u32]| {
            FrameData::new(&frames(f), l, 2, 9, Normalise::Clip)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(e(vec![vec![1.0, 2.0], vec![1.0]], &[0, 0]).contains("example 1"));
        assert!(e(vec![vec![]], &[0]).contains("no frames"));
        assert!(e(vec![vec![1.0, 2.0]], &[2]).contains("label 2 is outside 0..2"));
        assert!(e(vec![vec![1.0, 2.0]], &[]).contains("1 clips but 0 labels"));
    }
}
