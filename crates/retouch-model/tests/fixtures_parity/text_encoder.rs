//! The CLIP text encoder (`nets/clip.rs`) against transformers' `CLIPTextModel` on towers the
//! SD 1.x checkpoints do not exercise (`tests/fixtures/generate_text_encoder.py`): the exact
//! GELU with LayerNorm eps 1e-6, and quick-GELU with the older `text_model.`-prefixed tensor
//! names; three id rows each (short, long, all 77 positions), with candle's products and, where
//! oneDNN is installed, oneDNN's f32 products (what the pipeline uses there); and in f16 and bf16
//! (a GPU's dtypes) on the CPU, against the same f32 reference with a wider bound.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use retouch_model::KernelChoice;
use retouch_model::config::TextEncoderConfig;
use retouch_model::kernels::LinearBackend;
use retouch_model::nets::clip::TextEncoder;

use crate::{fixtures, floats, read_json};

/// Largest |Δ| allowed against transformers' float32 output (values of magnitude ≤ 4).
const TOLERANCE: f32 = 1e-4;

#[test]
fn the_text_encoder_matches_transformers_with_gelu_other_eps_and_prefixed_names() {
    let cases = read_json("text_encoder/cases.json");
    let mut backends = vec![LinearBackend::Native];
    let auto = KernelChoice::default().resolve(&Device::Cpu, DType::F32).expect("kernels").clip_linear();
    if auto != LinearBackend::Native {
        backends.push(auto);
    }
    for case in cases["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let dir = fixtures().join("text_encoder").join(name);
        let config_json = read_json(&format!("text_encoder/{name}/config.json"));
        let config = TextEncoderConfig::from_json(config_json.as_object().expect("an object")).expect("config");
        assert_eq!(config.layer_norm_eps, case["layer_norm_eps"].as_f64().expect("eps"), "{name}");
        let ids: Vec<Vec<u32>> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|row| row.as_array().expect("row").iter().map(|v| v.as_u64().expect("id") as u32).collect())
            .collect();
        let want = floats(&case["last_hidden_state"]);
        let hidden = config.hidden_size;
        for &backend in &backends {
            let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights");
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
            let encoder = TextEncoder::new(&config, backend, vb).expect("encoder");
            // One row at a time, as the pipeline encodes prompts.
            for (r, row) in ids.iter().enumerate() {
                let input = Tensor::new(row.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
                let got = encoder.forward(&input).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
                let got = got.expect("forward");
                let expected = &want[r * row.len() * hidden..(r + 1) * row.len() * hidden];
                let worst = got.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                eprintln!("{name:>22} row {r} {backend:?}: max |Δ| {worst:.2e}");
                assert!(worst <= TOLERANCE, "{name} row {r} with {backend:?}: {worst} from transformers");
            }
        }
        // The GPU's dtypes, on the CPU: f16 and bf16 weights and activations, f32 attention.
        for (dtype, tolerance) in [(DType::F16, 0.05f32), (DType::BF16, 0.25)] {
            let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights");
            let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
            let encoder = TextEncoder::new(&config, LinearBackend::Native, vb).expect("encoder");
            let input = Tensor::new(ids[1].as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
            let out = encoder.forward(&input).expect("forward");
            assert_eq!(out.dtype(), dtype, "{name}");
            let got = out.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
            let expected = &want[ids[0].len() * hidden..2 * ids[0].len() * hidden];
            let worst = got.expect("values").iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            eprintln!("{name:>22} row 1 {dtype:?}: max |Δ| {worst:.2e}");
            assert!(worst <= tolerance, "{name} in {dtype:?}: {worst} from transformers' f32");
        }
    }
}
