//! Property tests of everything in the core that reads outside input: job bodies (arbitrary
//! bytes and arbitrary JSON values), cancel requests, the routing envelope of invalid jobs,
//! `s3://` URLs, and image preparation (arbitrary bytes, and generated images of every colour
//! type, size and container format). The property is always the same: a typed answer — a
//! valid value or a typed error — never a panic, and never more memory than the limits allow.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};
use proptest::prelude::*;
use retouch_core::error::ErrorKind;
use retouch_core::events::CancelRequest;
use retouch_core::imaging::{self, DecodeLimits, ImageError};
use retouch_core::job::{Envelope, ObjectUrl, parse_job, valid_job_id};

/// Arbitrary JSON, nested a few levels, with the protocol's keys over-represented.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("job_id".to_string()),
        Just("source".to_string()),
        Just("instruction".to_string()),
        Just("output".to_string()),
        Just("campaign_id".to_string()),
        Just("params".to_string()),
        Just("steps".to_string()),
        Just("seed".to_string()),
        Just("scheduler".to_string()),
        Just("priority".to_string()),
        Just("events".to_string()),
        Just("webhook".to_string()),
        Just("url".to_string()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)),
        ".{0,40}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("s3://bucket-a/in/x.png")),
        Just(serde_json::Value::from("euler-ancestral")),
        Just(serde_json::Value::from("high")),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_valid_job_or_an_invalid_job_error(body in prop::collection::vec(any::<u8>(), 0..512)) {
        match parse_job(&body).and_then(|j| j.validate("s3://out/edits")) {
            Ok(job) => prop_assert!(valid_job_id(&job.job.job_id)),
            Err(e) => prop_assert_eq!(e.kind, ErrorKind::InvalidJob),
        }
        let _ = Envelope::read(&body);
        if let Err(e) = CancelRequest::parse(&body) {
            prop_assert_eq!(e.kind, ErrorKind::InvalidJob);
        }
    }

    #[test]
    fn arbitrary_json_is_a_valid_job_or_an_invalid_job_error(value in json()) {
        let body = serde_json::to_vec(&value).expect("json");
        match parse_job(&body).and_then(|j| j.validate("s3://out/edits")) {
            Ok(job) => {
                prop_assert!(value.is_object(), "only objects are jobs");
                prop_assert!(valid_job_id(&job.job.job_id));
                prop_assert!((1..=500).contains(&job.params.steps));
                prop_assert!(!job.job.instruction.trim().is_empty());
                // The resolved locations print back to what parses to the same.
                prop_assert_eq!(ObjectUrl::parse(&job.output.to_string()), Ok(job.output.clone()));
            }
            Err(e) => prop_assert_eq!(e.kind, ErrorKind::InvalidJob),
        }
        let envelope = Envelope::read(&body);
        if let Some(id) = &envelope.job_id {
            prop_assert!(valid_job_id(id));
        }
        if let Ok(request) = CancelRequest::parse(&body) {
            prop_assert!(!request.job_ids.is_empty() || request.campaign_id.is_some());
        }
    }

    #[test]
    fn object_urls_parse_or_say_why_and_print_back(url in prop_oneof![
        ".{0,80}",
        "s3://[a-z0-9.-]{0,70}/.{0,40}",
        "file://.{0,40}",
    ]) {
        if let Ok(parsed) = ObjectUrl::parse(&url) {
            prop_assert_eq!(ObjectUrl::parse(&parsed.to_string()), Ok(parsed.clone()));
            prop_assert!(parsed.scheme == "s3" || parsed.scheme == "file");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let limits = DecodeLimits { max_pixels: 1 << 20, max_bytes: 1 << 20 };
        let _ = imaging::prepare(&body, limits, 512, 8);
    }

    #[test]
    fn generated_images_of_every_mode_size_and_format_prepare_or_fail_typed(
        width in 1u32..90,
        height in 1u32..90,
        mode in 0usize..6,
        format in 0usize..6,
        seed in any::<u8>(),
        max_side in prop_oneof![Just(16u32), Just(64u32), Just(512u32)],
    ) {
        let rgba = image::RgbaImage::from_fn(width, height, |x, y| {
            image::Rgba([(x * 7) as u8 ^ seed, (y * 5) as u8, seed, ((x + y) * 3) as u8])
        });
        let dynamic = DynamicImage::ImageRgba8(rgba);
        let image = match mode {
            0 => DynamicImage::ImageLuma8(dynamic.to_luma8()),
            1 => DynamicImage::ImageLumaA8(dynamic.to_luma_alpha8()),
            2 => DynamicImage::ImageRgb8(dynamic.to_rgb8()),
            3 => dynamic.clone(),
            4 => DynamicImage::ImageRgb16(dynamic.to_rgb16()),
            _ => DynamicImage::ImageRgba16(dynamic.to_rgba16()),
        };
        let format = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff][format];
        // Not every container stores every colour type: convert to one it takes.
        let image = match format {
            ImageFormat::Jpeg => DynamicImage::ImageRgb8(image.to_rgb8()),
            ImageFormat::WebP | ImageFormat::Gif => DynamicImage::ImageRgba8(image.to_rgba8()),
            ImageFormat::Bmp => DynamicImage::ImageRgb8(image.to_rgb8()),
            ImageFormat::Tiff if matches!(image, DynamicImage::ImageLumaA8(_)) => DynamicImage::ImageRgba8(image.to_rgba8()),
            _ => image,
        };
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).expect("encode the generated image");
        let bytes = bytes.into_inner();
        let limits = DecodeLimits { max_pixels: 4096, max_bytes: 1 << 20 };
        match imaging::prepare(&bytes, limits, max_side, 8) {
            Ok(prepared) => {
                let (w, h) = prepared.image.dimensions();
                prop_assert!(w % 8 == 0 && h % 8 == 0 && w.max(h) <= max_side.max(8));
                prop_assert!(u64::from(width) * u64::from(height) <= 4096);
            }
            Err(ImageError::TooLarge(_)) => prop_assert!(u64::from(width) * u64::from(height) > 4096),
            Err(ImageError::TooSmall(_)) => {}
            Err(e) => prop_assert!(false, "{format:?} {width}×{height} mode {mode}: {e}"),
        }
        // A truncated file is a typed error, never a panic.
        let cut = &bytes[..bytes.len() / 2];
        let _ = imaging::prepare(cut, limits, max_side, 8);
    }
}
