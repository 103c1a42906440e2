//! The CLIP tokenizer against transformers' `CLIPTokenizer` (fast) ids.

use retouch_model::tokenizer::ClipTokenizer;

use crate::{fixtures, read_json};

#[test]
fn ids_match_transformers_on_varied_prompts() {
    let data = read_json("tokenizer_cases.json");
    let tok = ClipTokenizer::from_dir(&fixtures().join("models/tiny-sd15/tokenizer"), 77).expect("tokenizer loads");
    let cases = data["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "expected at least 40 prompts, found {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let expected: Vec<u32> =
            case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let got = tok.encode(prompt).expect("encode");
        if got.ids != expected || got.truncated != case["truncated"].as_bool().expect("truncated") {
            failures.push(format!(
                "{prompt:?}:\n  expected {expected:?}\n  got      {:?} (truncated {})",
                got.ids, got.truncated
            ));
        }
        let unpadded = case["ids_unpadded"].as_array().expect("unpadded").len();
        assert_eq!(got.token_count, unpadded - 2, "{prompt:?}: token count");
    }
    assert!(failures.is_empty(), "{} of {} prompts differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn reference_ids_from_the_clip_vocabulary() {
    // shared/reference/instructpix2pix.md §8.3, from the real CLIP vocabulary.
    let tok = ClipTokenizer::from_dir(&fixtures().join("models/tiny-sd15/tokenizer"), 77).expect("tokenizer loads");
    for (text, ids) in [
        ("a photo of a cat", vec![49406, 320, 1125, 539, 320, 2368, 49407]),
        ("turn him into a cyborg", vec![49406, 2105, 1269, 1095, 320, 36650, 49407]),
        ("make the mountains snowy", vec![49406, 1078, 518, 5873, 14191, 49407]),
        ("", vec![49406, 49407]),
    ] {
        let got = tok.encode(text).expect("encode");
        assert_eq!(&got.ids[..ids.len()], ids.as_slice(), "{text:?}");
        assert!(got.ids[ids.len()..].iter().all(|&id| id == 49407), "{text:?}: padding");
    }
}
