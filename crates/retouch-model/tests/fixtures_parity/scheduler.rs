//! Schedulers against diffusers: timestep/sigma tables for every spacing and offset, every
//! scheduler (and its Karras variant) over 1–50, 75, 100 and 500 steps, other config paths of
//! the multistep solvers, which classes have Karras sigmas at all, and step-by-step
//! `scale_model_input` / `step` walks from fixed inputs.

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

/// Checks one recorded `set_timesteps` result (or error) against ours; returns whether a
/// schedule was compared.
fn check_schedule(what: &str, case: &Value, ours: Result<Schedule, retouch_model::ModelError>) -> bool {
    if let Some(error) = case.get("error") {
        assert!(ours.is_err(), "{what}: diffusers failed ({error}) but we did not");
        return false;
    }
    let timesteps = floats(&case["timesteps"]);
    if timesteps[1..].contains(&timesteps[0]) {
        // diffusers would begin at the second occurrence of the first timestep and step past the
        // end of its sigmas; we refuse the schedule up front.
        let err = ours.expect_err(what).to_string();
        assert!(err.contains("repeat the first timestep"), "{what}: {err}");
        return false;
    }
    let schedule = ours.unwrap_or_else(|e| panic!("{what}: {e}"));
    close(&format!("{what} timesteps"), schedule.timesteps(), &timesteps, 1e-6);
    if let Some(sigmas) = case.get("sigmas").filter(|s| !s.is_null()) {
        close(&format!("{what} sigmas"), schedule.sigmas(), &floats(sigmas), 2e-6);
    }
    let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma") as f32;
    close(&format!("{what} init_noise_sigma"), &[schedule.init_noise_sigma()], &[init], 2e-6);
    true
}

fn kind_of(case: &Value) -> SchedulerKind {
    case["scheduler"].as_str().expect("name").parse().expect("kind")
}

fn karras_of(case: &Value) -> Option<bool> {
    case.get("karras_sigmas").and_then(Value::as_bool)
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
    let mut compared = 0;
    for case in schedules {
        let kind = kind_of(case);
        let config = config_with(
            &data["config"],
            &[("timestep_spacing", case["timestep_spacing"].clone()), ("steps_offset", case["steps_offset"].clone())],
        );
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let karras = karras_of(case);
        let what = format!(
            "{kind} {} offset {} steps {steps} karras {karras:?}",
            case["timestep_spacing"], case["steps_offset"]
        );
        let ours = SchedulerConfig::resolve(kind, &config, karras).and_then(|c| Schedule::new(&c, steps));
        compared += usize::from(check_schedule(&what, case, ours));
    }
    // 6 schedulers × 3 spacings × 2 offsets × 9 step counts, plus Euler with Karras sigmas.
    assert!(compared >= 6 * 54 + 54, "{compared} schedules compared");
}

#[test]
fn every_scheduler_matches_over_many_step_counts() {
    let data = read_json("scheduler_cases.json");
    let mut seen = std::collections::BTreeSet::new();
    let mut compared = 0;
    for case in data["schedules_many"].as_array().expect("schedules_many") {
        let kind = kind_of(case);
        let karras = karras_of(case);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let what = format!("{kind} karras {karras:?} steps {steps}");
        let config = data["config"].as_object().expect("config");
        let ours = SchedulerConfig::resolve(kind, config, karras).and_then(|c| Schedule::new(&c, steps));
        if check_schedule(&what, case, ours) {
            compared += 1;
            seen.insert((kind.as_str(), karras == Some(true)));
        }
    }
    // Every scheduler, and the Karras variant of each that has one.
    assert_eq!(seen.len(), SchedulerKind::ALL.len() + 4, "{seen:?}");
    assert!(compared >= 10 * 53, "{compared} schedules compared");
}

#[test]
fn multistep_config_paths_match() {
    let data = read_json("scheduler_cases.json");
    let mut compared = 0;
    for case in data["schedules_config"].as_array().expect("schedules_config") {
        let kind = kind_of(case);
        let overrides: Vec<(&str, Value)> =
            case["overrides"].as_object().expect("overrides").iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let config = config_with(&data["config"], &overrides);
        let karras = karras_of(case);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let what = format!("{kind} {:?} karras {karras:?} steps {steps}", case["overrides"]);
        let ours = SchedulerConfig::resolve(kind, &config, karras).and_then(|c| Schedule::new(&c, steps));
        compared += usize::from(check_schedule(&what, case, ours));
    }
    assert!(compared >= 30, "{compared} schedules compared");
}

#[test]
fn karras_sigmas_exist_exactly_where_diffusers_has_them() {
    let data = read_json("scheduler_cases.json");
    let config = data["config"].as_object().expect("config");
    let supported = data["karras_supported"].as_object().expect("karras_supported");
    assert_eq!(supported.len(), SchedulerKind::ALL.len());
    for kind in SchedulerKind::ALL {
        let expected = supported[kind.as_str()].as_bool().expect("bool");
        assert_eq!(kind.supports_karras_sigmas(), expected, "{kind}");
        match SchedulerConfig::resolve(kind, config, Some(true)) {
            Ok(c) => assert!(expected && c.karras_sigmas, "{kind}"),
            Err(e) => {
                let e = e.to_string();
                assert!(!expected && e.contains("use_karras_sigmas") && e.contains(kind.diffusers_class()), "{e}");
            }
        }
        // Off is always fine; a checkpoint config asking for them is ignored by classes
        // without the option (as diffusers' from_config ignores unknown keys).
        assert!(!SchedulerConfig::resolve(kind, config, Some(false)).expect("off").karras_sigmas);
        let mut asks = config.clone();
        asks.insert("use_karras_sigmas".into(), Value::Bool(true));
        assert_eq!(SchedulerConfig::from_diffusers(kind, &asks).expect("config").karras_sigmas, expected, "{kind}");
    }
}

#[test]
fn unimplemented_multistep_options_are_refused_by_name() {
    let data = read_json("scheduler_cases.json");
    for (kind, key, value) in [
        (SchedulerKind::DpmppTwoM, "solver_order", serde_json::json!(3)),
        (SchedulerKind::DpmppTwoM, "solver_type", serde_json::json!("heun")),
        (SchedulerKind::DpmppTwoMSde, "use_lu_lambdas", serde_json::json!(true)),
        (SchedulerKind::DpmppTwoM, "final_sigmas_type", serde_json::json!("sigma_min")),
        (SchedulerKind::DpmppTwoM, "variance_type", serde_json::json!("learned_range")),
        (SchedulerKind::DpmppTwoM, "thresholding", serde_json::json!(true)),
        (SchedulerKind::Unipc, "solver_type", serde_json::json!("bh1")),
        (SchedulerKind::Unipc, "predict_x0", serde_json::json!(false)),
        (SchedulerKind::Unipc, "disable_corrector", serde_json::json!([0])),
        (SchedulerKind::Unipc, "lower_order_final", serde_json::json!(false)),
        (SchedulerKind::Unipc, "use_exponential_sigmas", serde_json::json!(true)),
        (SchedulerKind::Euler, "use_beta_sigmas", serde_json::json!(true)),
        (SchedulerKind::Unipc, "prediction_type", serde_json::json!("v_prediction")),
    ] {
        let config = config_with(&data["config"], &[(key, value.clone())]);
        let err = SchedulerConfig::from_diffusers(kind, &config).expect_err(key).to_string();
        assert!(err.contains(key), "{kind} {key}={value}: {err}");
    }
    // The timbrooks config's DPM-solver keys are read, not refused: dpmsolver++, order 2, midpoint.
    let dpm = SchedulerConfig::from_diffusers(SchedulerKind::DpmppTwoMSde, data["config"].as_object().expect("config"))
        .expect("timbrooks config");
    assert_eq!((dpm.solver_order, dpm.karras_sigmas), (2, false));
    // A saved DPMSolverMultistepScheduler config says lambda_min_clipped: -Infinity.
    let config = config_with(&data["config"], &[("lambda_min_clipped", Value::String("-Infinity".into()))]);
    assert!(SchedulerConfig::from_diffusers(SchedulerKind::DpmppTwoM, &config).is_ok());
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
    let mut walks = std::collections::BTreeSet::new();
    for case in data["steps"].as_array().expect("steps") {
        // η > 0 DDIM is not exposed (the pipeline always runs η = 0).
        if case["step_kwargs"].get("eta").and_then(Value::as_f64).is_some_and(|eta| eta != 0.0) {
            continue;
        }
        let kind = kind_of(case);
        let overrides: Vec<(&str, Value)> =
            case["overrides"].as_object().expect("overrides").iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let config = config_with(&data["config"], &overrides);
        let steps = case["num_inference_steps"].as_u64().expect("steps") as usize;
        let schedule =
            Schedule::new(&SchedulerConfig::from_diffusers(kind, &config).expect("config"), steps).expect("schedule");
        let mut generator = TorchGenerator::new(case["seed"].as_u64().expect("seed"));
        let mut x = tensor(floats(&inputs["sample"]));
        let begin = case["begin_index"].as_u64().expect("begin") as usize;
        let mut sampler = schedule.sampler_from(begin);
        for result in case["results"].as_array().expect("results") {
            let index = result["step_index"].as_u64().expect("index") as usize;
            let what = format!("{kind} {:?} steps {steps} index {index}", case["overrides"]);
            assert_eq!(sampler.index(), index, "{what}: consecutive steps");
            let t = result["timestep"].as_f64().expect("timestep") as f32;
            assert!((sampler.timestep().expect("timestep") - t).abs() < 1e-3, "{what}: timestep");
            let scaled = sampler.scale_model_input(&x).expect("scale");
            close(
                &format!("{what} scaled"),
                &scaled.flatten_all().and_then(|t| t.to_vec1()).expect("vec"),
                &floats(&result["scaled_model_input"]),
                1e-5,
            );
            let draws = result["generator_draws"].as_u64().expect("draws");
            assert_eq!(draws, u64::from(schedule.draws_step_noise()), "{what}: noise draws per step");
            let noise = schedule.draws_step_noise().then(|| tensor(generator.randn(numel)));
            x = sampler.step(&model_output, &x, noise.as_ref()).expect("step");
            close(
                &format!("{what} prev_sample"),
                &x.flatten_all().and_then(|t| t.to_vec1()).expect("vec"),
                &floats(&result["prev_sample"]),
                1e-5,
            );
            checked += 1;
        }
        if case["results"].as_array().is_some_and(|r| r.len() == steps) {
            walks.insert(kind.as_str());
        }
    }
    assert!(checked >= 100, "only {checked} steps checked");
    // A whole walk (every step, state carried over) for each multistep solver and Euler.
    for kind in ["dpmpp-2m", "dpmpp-2m-sde", "unipc", "euler"] {
        assert!(walks.contains(kind), "no complete walk of {kind}: {walks:?}");
    }
}
