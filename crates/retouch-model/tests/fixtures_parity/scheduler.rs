//! Schedulers against diffusers: timestep/sigma tables for every spacing and offset, and
//! step-by-step `scale_model_input` / `step` results from fixed inputs.

use candle_core::{Device, Tensor};
use retouch_model::rng::TorchGenerator;
use retouch_model::scheduler::{Schedule, SchedulerConfig, SchedulerKind};
use serde_json::{Map, Value};

use crate::{floats, read_json};

fn config_with(base: &Value, overrides: &[(&str, Value)]) -> Map<String, Value> {
    let mut config = base.as_object().expect("config object").clone();
    for (k, v) in overrides {
        config.insert((*k).to_string(), v.clone());
    }
    config
}

fn close(what: &str, got: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: length {} vs diffusers {}", got.len(), expected.len());
    for (i, (a, b)) in got.iter().zip(expected).enumerate() {
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}[{i}]: {a} vs diffusers {b}");
    }
}

#[test]
fn alphas_cumprod_match() {
    let data = read_json("scheduler_cases.json");
    let cfg =
        SchedulerConfig::from_diffusers(SchedulerKind::EulerAncestral, data["config"].as_object().expect("config"))
            .expect("config");
    close("alphas_cumprod", &cfg.alphas_cumprod(), &floats(&data["alphas_cumprod"]), 1e-6);
}

#[test]
fn timesteps_and_sigmas_match_for_every_spacing() {
    let data = read_json("scheduler_cases.json");
    let schedules = data["schedules"].as_array().expect("schedules");
    assert!(schedules.len() >= 100, "{} schedules", schedules.len());
    for case in schedules {
        let kind: SchedulerKind = case["scheduler"].as_str().expect("name").parse().expect("kind");
        let config = config_with(
            &data["config"],
            &[("timestep_spacing", case["timestep_spacing"].clone()), ("steps_offset", case["steps_offset"].clone())],
        );
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let what = format!("{kind} {} offset {} steps {steps}", case["timestep_spacing"], case["steps_offset"]);
        let schedule =
            Schedule::new(&SchedulerConfig::from_diffusers(kind, &config).expect("config"), steps).expect(&what);
        close(&format!("{what} timesteps"), schedule.timesteps(), &floats(&case["timesteps"]), 1e-6);
        if let Some(sigmas) = case.get("sigmas").filter(|s| !s.is_null()) {
            close(&format!("{what} sigmas"), schedule.sigmas(), &floats(sigmas), 2e-6);
        }
        let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma") as f32;
        close(&format!("{what} init_noise_sigma"), &[schedule.init_noise_sigma()], &[init], 2e-6);
    }
}

#[test]
fn steps_match_from_fixed_inputs() {
    let data = read_json("scheduler_cases.json");
    let inputs = &data["step_inputs"];
    let shape: Vec<usize> =
        inputs["shape"].as_array().expect("shape").iter().map(|v| v.as_u64().expect("dim") as usize).collect();
    let numel: usize = shape.iter().product();
    let dev = Device::Cpu;
    let tensor = |v: Vec<f32>| Tensor::from_vec(v, shape.as_slice(), &dev).expect("tensor");
    let model_output = tensor(floats(&inputs["model_output"]));
    let mut checked = 0;
    for case in data["steps"].as_array().expect("steps") {
        // η > 0 DDIM is not exposed (the pipeline always runs η = 0).
        if case["step_kwargs"].get("eta").and_then(Value::as_f64).is_some_and(|eta| eta != 0.0) {
            continue;
        }
        let kind: SchedulerKind = case["scheduler"].as_str().expect("name").parse().expect("kind");
        let overrides: Vec<(&str, Value)> =
            case["overrides"].as_object().expect("overrides").iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let config = config_with(&data["config"], &overrides);
        let steps = case["num_inference_steps"].as_u64().expect("steps") as usize;
        let schedule =
            Schedule::new(&SchedulerConfig::from_diffusers(kind, &config).expect("config"), steps).expect("schedule");
        let mut generator = TorchGenerator::new(case["seed"].as_u64().expect("seed"));
        let mut x = tensor(floats(&inputs["sample"]));
        for result in case["results"].as_array().expect("results") {
            let index = result["step_index"].as_u64().expect("index") as usize;
            let what = format!("{kind} {:?} steps {steps} index {index}", case["overrides"]);
            let t = result["timestep"].as_f64().expect("timestep") as f32;
            assert!((schedule.timesteps()[index] - t).abs() < 1e-3, "{what}: timestep");
            let scaled = schedule.scale_model_input(&x, index).expect("scale");
            close(
                &format!("{what} scaled"),
                &scaled.flatten_all().and_then(|t| t.to_vec1()).expect("vec"),
                &floats(&result["scaled_model_input"]),
                1e-5,
            );
            let noise = schedule.draws_step_noise().then(|| tensor(generator.randn(numel)));
            x = schedule.step(&model_output, index, &x, noise.as_ref()).expect("step");
            close(
                &format!("{what} prev_sample"),
                &x.flatten_all().and_then(|t| t.to_vec1()).expect("vec"),
                &floats(&result["prev_sample"]),
                1e-5,
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} steps checked");
}
