//! `[model.audio]`: the encoder's sizes, how many frames of a clip are kept, how frames are
//! normalised, and how the classification head reads a demultiplexed clip.

use datamux_core::encoder;
use serde::{Deserialize, Serialize};

/// How a clip's frames are normalised before the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalise {
    /// Every coefficient to mean 0 and variance 1 over the clip's own frames (cepstral mean and
    /// variance normalisation): removes the recording's level and channel, which MFCCs carry in
    /// their means (the energy coefficient c0 of spoken digits spans about -590 to -160).
    #[default]
    Clip,
    /// The frames as stored.
    None,
}

/// What the head reads for instance i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// The demultiplexed summary position (the index demux's prefix slot of instance i).
    #[default]
    Summary,
    /// The mean of the demultiplexed positions over instance i's own (non-padding) frames.
    Mean,
}

/// Masking of training inputs (SpecAugment, Park et al. 2019, arXiv 1904.08779): for every
/// instance of a training batch, `time_masks` spans of up to `time_width` frames and
/// `coefficient_masks` spans of up to `coefficient_width` coefficients are set to 0 (the clip's
/// mean, after per-clip normalisation). Scoring and timing see the clips whole.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    pub time_masks: usize,
    pub time_width: usize,
    pub coefficient_masks: usize,
    pub coefficient_width: usize,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        (self.time_masks == 0 || self.time_width == 0)
            && (self.coefficient_masks == 0 || self.coefficient_width == 0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub encoder: encoder::Config,
    /// Frames kept of each clip (the first ones), `L`; also the length every instance is padded
    /// to when timed.
    pub max_frames: usize,
    pub normalise: Normalise,
    /// Dropout on the frame embeddings.
    pub embedding_dropout: f64,
    /// LayerNorm on the projected frames plus positions, before muxing (as text's embedding
    /// LayerNorm).
    pub embedding_norm: bool,
    pub readout: Readout,
    /// Training-time masking; off by default.
    pub augment: Augment,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            encoder: encoder::Config {
                num_hidden_layers: 2,
                hidden_size: 64,
                num_attention_heads: 4,
                intermediate_size: 256,
                ..encoder::Config::small()
            }, // spoken digits: 2 400 short clips, a small trunk
            max_frames: 64, // spoken digits: 6 to 92 frames a clip, 2 of 3 000 over 64
            normalise: Normalise::Clip,
            embedding_dropout: 0.1, // as the encoder's hidden dropout
            embedding_norm: true,
            readout: Readout::Summary,
            augment: Augment::default(),
        }
    }
}

impl Config {
    /// Test size (odd, as every component's): 2 x 32, 4 heads, FFN 37, 11 frames, no dropout.
    pub fn tiny() -> Self {
        Self {
            encoder: encoder::Config::tiny(),
            max_frames: 11,
            embedding_dropout: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.encoder.validate().map_err(|e| e.to_string())?;
        if self.max_frames == 0 {
            return Err("audio.max_frames must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.embedding_dropout) {
            return Err(format!(
                "audio.embedding_dropout must be in [0, 1), got {}",
                self.embedding_dropout
            ));
        }
        Ok(())
    }
}
