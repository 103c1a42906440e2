//! The torch-compatible generator against `torch.randn` draws.

use retouch_model::rng::TorchGenerator;

use crate::{floats, read_json};

#[test]
fn draws_match_torch() {
    let data = read_json("rng_cases.json");
    let cases = data["cases"].as_array().expect("cases");
    let mut checked = 0;
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed");
        let numel = case["numel"].as_u64().expect("numel") as usize;
        let mut g = TorchGenerator::new(seed);
        for (k, draw) in case["draws"].as_array().expect("draws").iter().enumerate() {
            let got = g.randn(numel);
            let expected =
                if draw.get("values").is_some() { floats(&draw["values"]) } else { floats(&draw["first_32"]) };
            for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() <= 2e-6, "seed {seed} numel {numel} draw {k} index {i}: {a} vs torch {b}");
            }
            let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
            let expected_sum = draw["sum"].as_f64().expect("sum");
            assert!(
                (sum - expected_sum).abs() <= 1e-5 * numel as f64,
                "seed {seed} draw {k}: sum {sum} vs {expected_sum}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} draws checked");
}
