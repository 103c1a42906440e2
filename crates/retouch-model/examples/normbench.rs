//! Times GroupNorm + SiLU on the CPU in float32: `nets::norm::GroupNorm::forward_silu` (fused,
//! two parallel passes) against what the networks ran before, candle-nn's `GroupNorm` followed
//! by `silu()`, on the shapes of a 512-pixel edit (UNet at batch 3 on 64² latents, the VAE
//! decoder at batch 1 and full resolution). Best of 5 runs each, so other load on the machine
//! inflates neither side much.
//!
//! `cargo run --release -p retouch-model --example normbench`
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use retouch_model::nets::norm::GroupNorm;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("GroupNorm(32) + SiLU, f32, {} threads; best of 5", candle_core::utils::get_num_threads());
    println!("{:<28} {:>10} {:>10} {:>7}", "shape [B, C, H, W]", "candle s", "ours s", "×");
    let (mut total_candle, mut total_ours) = (0.0, 0.0);
    for (b, c, hw) in [
        (3usize, 320usize, 64usize),
        (3, 640, 32),
        (3, 1280, 16),
        (3, 2560, 8),
        (1, 512, 64),
        (1, 256, 256),
        (1, 128, 512),
    ] {
        let weight = Tensor::randn(1f32, 0.1, c, &dev)?;
        let bias = Tensor::randn(0f32, 0.1, c, &dev)?;
        let vb = candle_nn::VarBuilder::from_tensors(
            [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())].into(),
            DType::F32,
            &dev,
        );
        let ours = GroupNorm::load(32, c, 1e-5, vb)?;
        let theirs = candle_nn::GroupNorm::new(weight, bias, c, 32, 1e-5)?;
        let x = Tensor::randn(0f32, 1., (b, c, hw, hw), &dev)?;
        let best = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let candle = best(&|| theirs.forward(&x)?.silu())?;
        let fused = best(&|| ours.forward_silu(&x))?;
        total_candle += candle;
        total_ours += fused;
        println!("{:<28} {candle:>10.4} {fused:>10.4} {:>7.1}", format!("[{b}, {c}, {hw}, {hw}]"), candle / fused);
    }
    println!("{:<28} {total_candle:>10.4} {total_ours:>10.4} {:>7.1}", "sum", total_candle / total_ours);
    Ok(())
}
