//! Times the CPU conv2d of `nets::conv` against candle's on the shapes that dominate SD 1.5
//! (`cargo run --release -p retouch-model --example convbench`).
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use retouch_model::nets::conv::Conv2d;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (c, hw) in [(128usize, 128usize), (320, 32), (640, 16), (1280, 8)] {
        let tensors = [
            ("weight".to_string(), Tensor::randn(0f32, 1., (c, c, 3, 3), &dev)?),
            ("bias".to_string(), Tensor::randn(0f32, 1., c, &dev)?),
        ];
        let vb = candle_nn::VarBuilder::from_tensors(tensors.into(), DType::F32, &dev);
        let ours = Conv2d::load(c, c, 3, 1, 1, retouch_model::kernels::ConvBackend::Im2col, vb.clone())?;
        let theirs = candle_nn::conv2d(c, c, 3, candle_nn::Conv2dConfig { padding: 1, ..Default::default() }, vb)?;
        let x = Tensor::randn(0f32, 1., (3, c, hw, hw), &dev)?;
        let flops = 3.0 * 2.0 * (c * c * 9 * hw * hw) as f64;
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..3 {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / 3.0)
        };
        let a = time(&|| ours.forward(&x))?;
        let b = time(&|| theirs.forward(&x))?;
        println!(
            "c {c:>4} {hw:>3}×{hw:<3} batch 3: ours {a:.3} s ({:.1} GFLOP/s), candle {b:.3} s ({:.1} GFLOP/s), ×{:.2}",
            flops / a / 1e9,
            flops / b / 1e9,
            b / a
        );
    }
    Ok(())
}
