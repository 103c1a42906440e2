//! The input image policy and output encoding.
//!
//! Policy, in order (documented in `docs/model.md`):
//! 1. decode with limits: the header's dimensions are checked against `max_pixels` before any
//!    pixel is allocated, so a file claiming 100000×100000 is refused cheaply;
//! 2. apply the EXIF orientation (phone photos would otherwise be edited sideways);
//! 3. flatten alpha onto white (`c·a + 255·(255 − a)`, rounded), then RGB;
//! 4. if the longer side exceeds `max_side`, scale so it equals `max_side` keeping the aspect
//!    ratio (each side rounded half up), then floor each side to a multiple of the model's
//!    factor (8 for SD 1.5) — one Lanczos-3 resample from the original straight to that size;
//! 5. an image that already fits and is a multiple of 8 is not resampled at all.
//!
//! The resampler reproduces Pillow's `Image.resize(size, LANCZOS)` bit for bit (the same
//! filter, support scaling, 22-bit fixed-point coefficients and separable horizontal-then-
//! vertical passes with 8-bit intermediates), because diffusers resizes with Pillow: inputs
//! that need flooring to a multiple of 8 then reach the model exactly as they do in Python.
//! The same resampler with Pillow's bicubic filter ([`resize_bicubic`]) serves the safety
//! checker's CLIP preprocessing, which transformers also does with Pillow.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::params::OutputFormat;

/// Bounds on what the decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width × height of the encoded image (before any resize).
    pub max_pixels: u64,
    /// Largest accepted encoded size in bytes.
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 64 MP covers every phone and most DSLR photos; 64 MiB any sane encoding of them.
        Self { max_pixels: 64_000_000, max_bytes: 64 << 20 }
    }
}

/// Why an input image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not a decodable image (unknown format, truncated, corrupt).
    #[error("not a valid image: {0}")]
    Invalid(String),
    /// The image exceeds the decode limits.
    #[error("image too large: {0}")]
    TooLarge(String),
    /// After the size policy nothing would be left (a side shorter than the model's factor).
    #[error("image too small: {0}")]
    TooSmall(String),
    /// The output could not be encoded.
    #[error("cannot encode the output: {0}")]
    Encode(String),
}

/// A decoded, oriented, flattened RGB image and what was done to it.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    /// The pixels, orientation applied.
    pub image: RgbImage,
    /// Whether an alpha channel was flattened onto white.
    pub had_alpha: bool,
}

/// Decodes `bytes` under `limits`, applies EXIF orientation and flattens alpha onto white.
///
/// # Errors
/// [`ImageError::TooLarge`] beyond the limits (checked from the header first),
/// [`ImageError::Invalid`] for anything undecodable.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DecodedImage, ImageError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(ImageError::TooLarge(format!("{} bytes exceeds the limit of {}", bytes.len(), limits.max_bytes)));
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Invalid(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::Invalid("unrecognised image format".into()));
    }
    let mut decoder = reader.into_decoder().map_err(|e| ImageError::Invalid(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(ImageError::TooLarge(format!("{w}×{h} exceeds the limit of {} pixels", limits.max_pixels)));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Invalid(e.to_string()))?;
    image.apply_orientation(orientation);
    let had_alpha = image.color().has_alpha();
    let image = if had_alpha { flatten_onto_white(&image) } else { image.to_rgb8() };
    Ok(DecodedImage { image, had_alpha })
}

/// Composites an image with alpha over opaque white.
pub fn flatten_onto_white(image: &DynamicImage) -> RgbImage {
    let rgba = image.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            let v = u32::from(src[c]) * a + 255 * (255 - a);
            dst[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}

/// The processed size of a `width × height` image: scaled so the longer side is at most
/// `max_side`, then floored to multiples of `multiple`.
///
/// # Errors
/// [`ImageError::TooSmall`] when a side would become 0.
pub fn target_size(width: u32, height: u32, max_side: u32, multiple: u32) -> Result<(u32, u32), ImageError> {
    let long = width.max(height);
    let (w, h) = if long > max_side {
        let scale = f64::from(max_side) / f64::from(long);
        let side = |s: u32| ((f64::from(s) * scale + 0.5).floor() as u32).min(max_side);
        (side(width), side(height))
    } else {
        (width, height)
    };
    let (tw, th) = (w - w % multiple, h - h % multiple);
    if tw == 0 || th == 0 {
        return Err(ImageError::TooSmall(format!(
            "{width}×{height} gives {w}×{h}; each side must be at least {multiple} pixels after resizing"
        )));
    }
    Ok((tw, th))
}

/// Applies the size policy: resamples (Pillow Lanczos) only when the size changes.
///
/// # Errors
/// [`ImageError::TooSmall`] as [`target_size`].
pub fn fit(image: RgbImage, max_side: u32, multiple: u32) -> Result<RgbImage, ImageError> {
    let (tw, th) = target_size(image.width(), image.height(), max_side, multiple)?;
    if (tw, th) == image.dimensions() { Ok(image) } else { Ok(resize_lanczos(&image, tw, th)) }
}

/// Decodes and fits in one call: what every entry point does with an input image.
///
/// # Errors
/// As [`decode`] and [`fit`].
pub fn prepare(bytes: &[u8], limits: DecodeLimits, max_side: u32, multiple: u32) -> Result<DecodedImage, ImageError> {
    let decoded = decode(bytes, limits)?;
    Ok(DecodedImage { image: fit(decoded.image, max_side, multiple)?, had_alpha: decoded.had_alpha })
}

/// Encodes an RGB image.
///
/// # Errors
/// [`ImageError::Encode`] if the encoder fails.
pub fn encode(image: &RgbImage, format: OutputFormat, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        OutputFormat::Png => image.write_to(&mut out, image::ImageFormat::Png),
        OutputFormat::Webp => image.write_to(&mut out, image::ImageFormat::WebP),
        OutputFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(image),
    };
    result.map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out.into_inner())
}

/// A small, valid PNG whose (correctly checksummed) header claims `width` × `height` pixels
/// — a decompression bomb in 100 bytes. For tests of the size limits, here and end to end.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut png = Vec::new();
    RgbImage::new(4, 4)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encoding a 4×4 PNG in memory cannot fail");
    // IHDR: length (8..12), "IHDR" (12..16), width (16..20), height (20..24), …, CRC (29..33).
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

// ---- Pillow's resampler -------------------------------------------------------------------

/// Fixed-point precision of the coefficients: 32 bits minus 8 for the pixel minus 2 for the
/// overshoot of a filter with negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// Pillow's `bicubic_filter`: the cubic convolution kernel with a = −0.5, support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// A Pillow resampling filter: its kernel and support (in input samples at scale 1).
#[derive(Clone, Copy)]
struct Filter {
    kernel: fn(f64) -> f64,
    support: f64,
}

const LANCZOS: Filter = Filter { kernel: lanczos, support: LANCZOS_SUPPORT };
const BICUBIC: Filter = Filter { kernel: bicubic, support: 2.0 };

/// One output pixel's taps: the first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Coefficients for resampling `in_size` samples to `out_size` (Pillow's `precompute_coeffs`
/// followed by `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let inv = 1.0 / filter_scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax).map(|x| (filter.kernel)((x as f64 - center + 0.5) * inv)).collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 }
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow-exact `resize((width, height), Image.LANCZOS)` of an RGB image.
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_with(image, width, height, LANCZOS)
}

/// Pillow-exact `resize((width, height), Image.BICUBIC)` of an RGB image (a copy when the
/// size is unchanged, as Pillow returns one).
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    resize_with(image, width, height, BICUBIC)
}

fn resize_with(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let src = image.as_raw();
    let half = 1i32 << (PRECISION_BITS - 1);

    // Pillow resamples horizontally only the rows the vertical pass will read.
    let vertical = coefficients(in_h, out_h, filter);
    let first_row = vertical.first().map_or(0, |t| t.start);
    let last_row = vertical.last().map_or(0, |t| t.start + t.weights.len());

    let (tmp, tmp_w) = if out_w != in_w {
        let horizontal = coefficients(in_w, out_w, filter);
        let rows = last_row - first_row;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let row = &src[(y + first_row) * in_w * 3..(y + first_row + 1) * in_w * 3];
            for (x, taps) in horizontal.iter().enumerate() {
                let mut acc = [half; 3];
                for (i, &k) in taps.weights.iter().enumerate() {
                    let p = &row[(taps.start + i) * 3..(taps.start + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i32::from(p[c]) * k;
                    }
                }
                for c in 0..3 {
                    tmp[(y * out_w + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        (tmp, out_w)
    } else {
        (src[first_row * in_w * 3..last_row * in_w * 3].to_vec(), in_w)
    };

    if out_h == in_h {
        // Only the horizontal pass was needed; the row window is the whole image.
        return RgbImage::from_raw(width, height, tmp).expect("buffer sized for the output; this is a bug");
    }
    let mut out = vec![0u8; out_w * out_h * 3];
    for (y, taps) in vertical.iter().enumerate() {
        for x in 0..tmp_w {
            let mut acc = [half; 3];
            for (i, &k) in taps.weights.iter().enumerate() {
                let p = &tmp[((taps.start - first_row + i) * tmp_w + x) * 3..][..3];
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * k;
                }
            }
            for c in 0..3 {
                out[(y * out_w + x) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(width, height, out).expect("buffer sized for the output; this is a bug")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 1 << 20, max_bytes: 1 << 20 };

    fn frame(seed: u8) -> image::RgbaImage {
        // 4 colours, all opaque: a GIF palette holds them exactly.
        image::RgbaImage::from_fn(24, 16, |x, y| {
            let colours = [[200, 30, 30, 255], [30, 200, 30, 255], [30, 30, 200, seed | 255], [seed, seed, seed, 255]];
            image::Rgba(colours[((x / 6 + y / 4) % 4) as usize])
        })
    }

    #[test]
    fn gif_bmp_and_tiff_sources_decode_and_an_animation_gives_its_first_frame() {
        use image::codecs::gif::{GifEncoder, Repeat};
        let (first, second) = (frame(90), frame(250));
        let mut gif = Vec::new();
        {
            let mut encoder = GifEncoder::new(&mut gif);
            encoder.set_repeat(Repeat::Infinite).expect("repeat");
            for f in [&first, &second] {
                encoder.encode_frame(image::Frame::new(f.clone())).expect("frame");
            }
        }
        let decoded = decode(&gif, LIMITS).expect("an animated GIF decodes");
        assert_eq!(decoded.image, DynamicImage::ImageRgba8(first.clone()).to_rgb8(), "the first frame, as Pillow");
        assert!(decoded.had_alpha, "GIF frames decode as RGBA; opaque pixels stay as they are");
        for format in [image::ImageFormat::Bmp, image::ImageFormat::Tiff] {
            let rgb = DynamicImage::ImageRgba8(second.clone()).to_rgb8();
            let mut bytes = Cursor::new(Vec::new());
            rgb.write_to(&mut bytes, format).expect("encode");
            let decoded = decode(bytes.get_ref(), LIMITS).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(decoded.image, rgb, "{format:?} decodes losslessly");
        }
        // The pixel limit is checked from the GIF's header, before any frame is decoded.
        let tight = DecodeLimits { max_pixels: 100, ..LIMITS };
        assert!(matches!(decode(&gif, tight), Err(ImageError::TooLarge(_))));
    }

    #[test]
    fn target_size_floors_and_bounds() {
        assert_eq!(target_size(64, 64, 512, 8).expect("fits"), (64, 64));
        assert_eq!(target_size(75, 53, 512, 8).expect("floors"), (72, 48));
        assert_eq!(target_size(200, 120, 64, 8).expect("scales"), (64, 32)); // 120·0.32 = 38.4 → 38 → 32
        assert_eq!(target_size(4000, 3000, 512, 8).expect("photo"), (512, 384));
        assert!(matches!(target_size(5, 100, 512, 8), Err(ImageError::TooSmall(_))));
    }

    #[test]
    fn images_that_fit_are_not_resampled() {
        let img = RgbImage::from_fn(16, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 5, 3]));
        assert_eq!(fit(img.clone(), 512, 8).expect("fits"), img);
    }

    #[test]
    fn resize_keeps_flat_colour_flat() {
        let img = RgbImage::from_pixel(75, 53, image::Rgb([10, 200, 77]));
        let out = resize_lanczos(&img, 72, 48);
        assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
    }

    #[test]
    fn bicubic_keeps_flat_colour_flat_and_matches_pillow_on_a_ramp() {
        let img = RgbImage::from_pixel(64, 40, image::Rgb([10, 200, 77]));
        assert!(resize_bicubic(&img, 224, 140).pixels().all(|p| p.0 == [10, 200, 77]));
        assert_eq!(resize_bicubic(&img, 64, 40), img);
        // Pillow 13: Image.frombytes("RGB", (4, 1), bytes([0,0,0, 85,85,85, 170,170,170, 255,255,255]))
        //   .resize((8, 1), Image.BICUBIC) → 0, 14, 60, 106, 149, 195, 241, 255 (every channel)
        let ramp = RgbImage::from_fn(4, 1, |x, _| image::Rgb([(x * 85) as u8; 3]));
        let out: Vec<u8> = resize_bicubic(&ramp, 8, 1).pixels().map(|p| p[0]).collect();
        assert_eq!(out, [0, 14, 60, 106, 149, 195, 241, 255]);
    }

    #[test]
    fn alpha_is_flattened_onto_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([0, 100, 200, 128]));
        let out = flatten_onto_white(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [127, 177, 227]);
    }

    #[test]
    fn header_dimensions_are_checked_before_decoding() {
        let err = decode(&png_claiming(100_000, 100_000), DecodeLimits::default());
        assert!(matches!(err, Err(ImageError::TooLarge(_))), "{err:?}");
    }

    #[test]
    fn truncated_png_is_invalid() {
        let mut png = Vec::new();
        RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8, y as u8, 9]))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        png.truncate(png.len() / 2);
        assert!(matches!(decode(&png, DecodeLimits::default()), Err(ImageError::Invalid(_))));
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(decode(b"not an image at all", DecodeLimits::default()), Err(ImageError::Invalid(_))));
    }
}
