//! Checks against the golden data HF diffusers / transformers / torch produced
//! (`tests/fixtures/generate.py`): tokenizer ids, scheduler tables and steps, torch RNG draws,
//! and whole-pipeline edits within 2/255 of diffusers on every pixel; the safety checker; and
//! `--dtype bf16` on the CPU against diffusers in bf16 (`generate_bf16.py`); the CLIP text
//! encoder on configs SD 1.x does not use (`generate_text_encoder.py`).

mod bf16;
mod pipeline;
mod rng;
mod safety;
mod scheduler;
mod text_encoder;
mod tokenizer;

use std::path::PathBuf;

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Parses a fixture JSON file.
pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The f32 values of a JSON array.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}
