//! Image decoding and normalisation: PNG/JPEG bytes -> channel-first `u8` pixels, kept compact in
//! memory and normalised per batch.

use serde::{Deserialize, Serialize};

/// Errors about image inputs; each names the row.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VisionError {
    #[error("row {row}: cannot decode image: {message}")]
    Decode { row: usize, message: String },
    #[error("row {row}: image is {found_w}x{found_h}, smaller than the {size}x{size} crop")]
    TooSmall {
        row: usize,
        found_w: u32,
        found_h: u32,
        size: usize,
    },
    #[error("row {row}: expected {expected} images' worth of labels, got {found}")]
    Count {
        row: usize,
        expected: usize,
        found: usize,
    },
}

/// What the model sees: channels, square size after a central crop, and per-channel statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSpec {
    /// 1 (grey) or 3 (RGB); images are converted to this.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub channels: usize,
    /// Side of the central square crop; the image must be at least this large.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub size: usize,
    #[serde(deserialize_with = "datamux_core::range::finite_list")]
    pub mean: Vec<f32>,
    #[serde(deserialize_with = "datamux_core::range::positive_list")]
    pub std: Vec<f32>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self::mnist()
    }
}

impl ImageSpec {
    /// MNIST: grey 28 x 28, the usual training-set statistics.
    pub fn mnist() -> Self {
        Self {
            channels: 1,
            size: 28,
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// CIFAR-10: RGB 32 x 32, per-channel training-set statistics.
    pub fn cifar10() -> Self {
        Self {
            channels: 3,
            size: 32,
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }

    pub fn pixels(&self) -> usize {
        self.channels * self.size * self.size
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.channels != 1 && self.channels != 3 {
            return Err(format!("channels must be 1 or 3, got {}", self.channels));
        }
        if self.size == 0 {
            return Err("image size must be at least 1".into());
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(format!(
                "mean and std need one value per channel ({}), got {} and {}",
                self.channels,
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| *s <= 0.0) {
            return Err("std values must be positive".into());
        }
        Ok(())
    }
}

/// Decode one image to channel-first `u8` pixels `(C, size, size)`, cropping the centre.
pub fn decode(bytes: &[u8], spec: &ImageSpec, row: usize) -> Result<Vec<u8>, VisionError> {
    let img = ::image::load_from_memory(bytes).map_err(|e| VisionError::Decode {
        row,
        message: e.to_string(),
    })?;
    let (w, h) = (img.width(), img.height());
    let size = spec.size as u32;
    if w < size || h < size {
        return Err(VisionError::TooSmall {
            row,
            found_w: w,
            found_h: h,
            size: spec.size,
        });
    }
    let img = img.crop_imm((w - size) / 2, (h - size) / 2, size, size);
    Ok(match spec.channels {
        1 => img.to_luma8().into_raw(),
        _ => {
            // Interleaved (H, W, 3) -> channel-first (3, H, W).
            let rgb = img.to_rgb8().into_raw();
            let hw = spec.size * spec.size;
            (0..3)
                .flat_map(|c| (0..hw).map(move |p| (c, p)))
                .map(|(c, p)| rgb[p * 3 + c])
                .collect()
        }
    })
}

/// A decoded split: `M` images of `spec.pixels()` bytes each, and their labels.
#[derive(Debug, Clone)]
pub struct ImageData {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub spec: ImageSpec,
}

impl ImageData {
    pub fn decode(
        images: &[Vec<u8>],
        labels: &[u32],
        spec: &ImageSpec,
    ) -> Result<Self, VisionError> {
        if images.len() != labels.len() {
            return Err(VisionError::Count {
                row: 0,
                expected: images.len(),
                found: labels.len(),
            });
        }
        let mut pixels = Vec::with_capacity(images.len() * spec.pixels());
        for (row, bytes) in images.iter().enumerate() {
            pixels.extend(decode(bytes, spec, row)?);
        }
        Ok(Self {
            pixels,
            labels: labels.to_vec(),
            spec: spec.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Normalised pixels of one image, `(x / 255 - mean_c) / std_c`, appended to `out`.
    pub fn push_normalised(&self, i: usize, out: &mut Vec<f32>) {
        let hw = self.spec.size * self.spec.size;
        let px = &self.pixels[i * self.spec.pixels()..(i + 1) * self.spec.pixels()];
        for (c, plane) in px.chunks(hw).enumerate() {
            let (m, s) = (self.spec.mean[c], self.spec.std[c]);
            out.extend(plane.iter().map(|v| (f32::from(*v) / 255.0 - m) / s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, rgb: bool) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let img: ::image::DynamicImage = if rgb {
            ::image::RgbImage::from_fn(w, h, |x, y| ::image::Rgb([x as u8, y as u8, 7])).into()
        } else {
            ::image::GrayImage::from_fn(w, h, |x, y| ::image::Luma([(x + 10 * y) as u8])).into()
        };
        img.write_to(&mut out, ::image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    #[test]
    fn grey_crop_takes_the_centre() -> Result<(), VisionError> {
        let spec = ImageSpec {
            size: 3,
            ..ImageSpec::mnist()
        };
        let px = decode(&png(5, 5, false), &spec, 0)?;
        // Centre 3x3 of a 5x5 image starts at (1, 1): value x + 10 y.
        assert_eq!(px, [11, 12, 13, 21, 22, 23, 31, 32, 33]);
        Ok(())
    }

    #[test]
    fn rgb_is_channel_first() -> Result<(), VisionError> {
        let spec = ImageSpec {
            size: 2,
            ..ImageSpec::cifar10()
        };
        let px = decode(&png(2, 2, true), &spec, 0)?;
        assert_eq!(px, [0, 1, 0, 1, 0, 0, 1, 1, 7, 7, 7, 7]);
        Ok(())
    }

    #[test]
    fn bad_bytes_and_small_images_name_the_row() {
        let spec = ImageSpec::mnist();
        let e = decode(b"not an image", &spec, 4)
            .expect_err("decoded garbage")
            .to_string();
        assert!(e.starts_with("row 4: cannot decode image"), "{e}");
        let e = decode(&png(5, 5, false), &spec, 2)
            .expect_err("5x5 is smaller than 28")
            .to_string();
        assert!(e.contains("row 2") && e.contains("28x28"), "{e}");
    }
}
