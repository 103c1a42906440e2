//! `StableDiffusionInstructPix2PixPipeline`, step for step as diffusers runs it, batched.
//!
//! For a batch of N same-size images with their own instructions, seeds and guidance scales:
//! 1. tokenize each instruction and each image's negative prompt (`""` when it has none) and
//!    encode them with CLIP;
//! 2. encode each image with the VAE: the posterior **mean**, **unscaled** (InstructPix2Pix
//!    was trained on `encode(x).mode()` without the 0.18215 factor);
//! 3. draw each image's initial noise from its own torch-compatible generator, × the
//!    scheduler's `init_noise_sigma`;
//! 4. per step, one UNet pass over all images: an image with guidance contributes three rows
//!    — (instruction, image latents), (negative, image latents), (negative, zeros) — one
//!    without guidance (`guidance_scale ≤ 1` or `image_guidance_scale < 1`, diffusers' rule,
//!    which then ignores the negative prompt) a single (instruction, image latents) row; the
//!    noisy latents are scaled by the scheduler before being concatenated with the (unscaled)
//!    image latents into the 8 input channels; guidance
//!    `uncond + gs·(text − image) + igs·(image − uncond)` per image, then the scheduler step
//!    (a [`crate::scheduler::Sampler`] holds the multistep solvers' state for the batch),
//!    Euler-ancestral and DPM++ 2M SDE drawing each image's noise from its own generator;
//! 5. decode `latents / scaling_factor`, map `x/2 + 0.5`, clamp, ×255, round half to even;
//! 6. with a safety checker ([`crate::safety`]; when the checkpoint names one, unless the
//!    policy is `off`), check each image on its own and make a flagged one black, as
//!    diffusers' `run_safety_checker` + `postprocess(do_denormalize=False)` do.
//!
//! Every per-image quantity is computed from that image's own inputs, and the batched
//! operations are row-independent, so an image's result does not depend on its batch — nor on
//! images leaving it: before each step the observer may drop images (a cancelled job), whose
//! rows then leave the latents, the solver state and the conditioning.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use retouch_core::editor::{EditBatch, EditError, EditErrorKind, EditObserver, EditedImage, Editor, ModelInfo};
use retouch_core::safety::SafetyPolicy;
use serde_json::{Map, Value};

use crate::config::{TextEncoderConfig, UNetConfig, VaeConfig, read_json_object};
use crate::device::DeviceSpec;
use crate::error::ModelError;
use crate::kernels::{KernelChoice, Kernels};
use crate::nets::clip::TextEncoder;
use crate::nets::unet::UNet;
use crate::nets::vae::AutoencoderKl;
use crate::rng::TorchGenerator;
use crate::safety::{SafetyChecker, checkpoint_has_checker};
use crate::scheduler::{self, Schedule, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{find_weight_files, load_component};

/// How to load a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Where to run (default CPU).
    pub device: DeviceSpec,
    /// Weight file variant (`fp16` → `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Compute dtype; default f32 on CPU, f16 on CUDA.
    pub dtype: Option<DType>,
    /// Convolution and attention implementations (GPU levers; `auto` by default).
    pub kernels: KernelChoice,
    /// Whether to load and run the checkpoint's safety checker (`auto`: when it ships one,
    /// as diffusers).
    pub safety_checker: SafetyPolicy,
}

/// A loaded InstructPix2Pix checkpoint.
pub struct InstructPix2Pix {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    /// The convolution and attention implementations the networks were built with.
    kernels: Kernels,
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    unet: UNet,
    vae: AutoencoderKl,
    /// The checkpoint's raw scheduler config; each edit resolves it for its scheduler kind.
    scheduler_config: Map<String, Value>,
    /// The safety checker, when the policy runs one; every decoded image goes through it.
    safety_checker: Option<SafetyChecker>,
}

impl std::fmt::Debug for InstructPix2Pix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstructPix2Pix").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Text encoder tensors that are buffers or heads, never part of `last_hidden_state`.
const TEXT_ENCODER_IGNORABLE: &[&str] = &["position_ids", "text_projection.weight"];

impl InstructPix2Pix {
    /// Loads a diffusers-layout checkpoint from `dir`. `name` labels it in logs and results.
    ///
    /// The pipeline class in `model_index.json` is not trusted (MagicBrush ports declare
    /// `StableDiffusionPipeline`); the UNet's `in_channels` decides whether this is an
    /// InstructPix2Pix model.
    ///
    /// # Errors
    /// [`ModelError`] naming the missing file, unsupported config key or bad tensors.
    pub fn load(dir: &Path, name: &str, options: &LoadOptions) -> Result<Self, ModelError> {
        let started = Instant::now();
        let device = options.device.open()?;
        let dtype = options.dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::F16 });
        let kernels = options.kernels.resolve(&device, dtype)?;
        // bf16 on the CPU is oneDNN's bf16 matrix products; the tensors between them, and the
        // text encoder, stay f32 (crate::onednn).
        let requested_dtype = dtype;
        let dtype = if kernels.cpu_bf16() { DType::F32 } else { dtype };
        let variant = options.variant.as_deref();

        let index = read_json_object(&dir.join("model_index.json"))?;
        if let Some(class) = index.get("_class_name").and_then(Value::as_str) {
            tracing::debug!(class, "model_index.json pipeline class (informational)");
        }

        let scheduler_config = read_json_object(&dir.join("scheduler/scheduler_config.json"))?;
        let default_scheduler = scheduler::default_kind(&scheduler_config);

        let te_config = TextEncoderConfig::from_json(&read_json_object(&dir.join("text_encoder/config.json"))?)?;
        let unet_config = UNetConfig::from_json(&read_json_object(&dir.join("unet/config.json"))?)?;
        let vae_config = VaeConfig::from_json(&read_json_object(&dir.join("vae/config.json"))?)?;
        let latent = vae_config.latent_channels;
        if unet_config.in_channels != 2 * latent {
            return Err(ModelError::UnsupportedConfig {
                component: "unet",
                key: "in_channels".into(),
                message: format!(
                    "{} input channels; an InstructPix2Pix UNet takes {} (noisy latents + image latents) — \
                     this looks like a text-to-image checkpoint",
                    unet_config.in_channels,
                    2 * latent
                ),
            });
        }
        if unet_config.out_channels != latent {
            return Err(ModelError::UnsupportedConfig {
                component: "unet",
                key: "out_channels".into(),
                message: format!("{} output channels for {latent} latent channels", unet_config.out_channels),
            });
        }
        if unet_config.cross_attention_dim != te_config.hidden_size {
            return Err(ModelError::UnsupportedConfig {
                component: "unet",
                key: "cross_attention_dim".into(),
                message: format!(
                    "{} does not match the text encoder width {}",
                    unet_config.cross_attention_dim, te_config.hidden_size
                ),
            });
        }

        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"), te_config.max_position_embeddings)?;
        let te_files = find_weight_files(&dir.join("text_encoder"), "model", variant)
            .or_else(|_| find_weight_files(&dir.join("text_encoder"), "pytorch_model", variant))?;
        let text_encoder = load_component("text_encoder", &te_files, dtype, &device, TEXT_ENCODER_IGNORABLE, |vb| {
            TextEncoder::new(&te_config, kernels.clip_linear(), vb)
        })?;
        let unet_files = find_weight_files(&dir.join("unet"), "diffusion_pytorch_model", variant)?;
        let unet = load_component("unet", &unet_files, dtype, &device, &[], |vb| UNet::new(&unet_config, kernels, vb))?;
        let vae_files = find_weight_files(&dir.join("vae"), "diffusion_pytorch_model", variant)?;
        let vae =
            load_component("vae", &vae_files, dtype, &device, &[], |vb| AutoencoderKl::new(&vae_config, kernels, vb))?;
        let safety_checker = if options
            .safety_checker
            .runs_checker(checkpoint_has_checker(&index)?)
            .map_err(|e| ModelError::SafetyChecker(e.to_string()))?
        {
            Some(SafetyChecker::load(dir, variant, dtype, &device, kernels.clip_linear())?)
        } else {
            None
        };
        tracing::info!(policy = %options.safety_checker, running = safety_checker.is_some(), "safety checker");

        let info = ModelInfo {
            name: name.to_string(),
            device: options.device.to_string(),
            dtype: format!("{requested_dtype:?}").to_lowercase(),
            size_multiple: vae_config.scale_factor() as u32,
            default_scheduler,
        };
        tracing::info!(model = name, device = %options.device, dtype = %info.dtype, %kernels,
            seconds = started.elapsed().as_secs_f64(), "model loaded");
        Ok(Self { info, device, dtype, kernels, tokenizer, text_encoder, unet, vae, scheduler_config, safety_checker })
    }

    /// The safety checker, when one runs.
    pub fn safety_checker(&self) -> Option<&SafetyChecker> {
        self.safety_checker.as_ref()
    }

    /// The scheduler config shipped with the checkpoint.
    pub fn scheduler_config(&self) -> &Map<String, Value> {
        &self.scheduler_config
    }

    /// The tokenizer (exposed for the CLI's truncation warning and for tests).
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The denoising network (exposed for benchmarks).
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// The dtype of the tensors between layers: the weights' dtype, or f32 when `--dtype bf16`
    /// runs oneDNN's bf16 products on the CPU (`Editor::info` reports the dtype asked for).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The convolution and attention implementations in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Prompt embeddings `[1, 77, hidden]` for one instruction, and whether it was truncated.
    ///
    /// # Errors
    /// Tokenizer or compute failures.
    pub fn encode_prompt(&self, text: &str) -> Result<(Tensor, bool), ModelError> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok((self.text_encoder.forward(&ids)?, tokens.truncated))
    }

    /// The VAE posterior means (unscaled) `[N, 4, H/f, W/f]` of same-size images, fed as
    /// `VaeImageProcessor` makes them (`x/255`, `2x − 1`, f32).
    ///
    /// # Errors
    /// Compute failures.
    pub fn encode_images(&self, images: &[&RgbImage]) -> Result<Tensor, ModelError> {
        let (w, h) =
            images.first().map(|i| i.dimensions()).ok_or_else(|| ModelError::InvalidInput("no images".into()))?;
        let (w, h) = (w as usize, h as usize);
        let mut data = Vec::with_capacity(images.len() * 3 * h * w);
        for image in images {
            let raw = image.as_raw();
            for c in 0..3 {
                data.extend(raw.iter().skip(c).step_by(3).map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0));
            }
        }
        let pixels = Tensor::from_vec(data, (images.len(), 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        Ok(self.one_image_at_a_time_on_cpu(&pixels, |x| self.vae.encode_mean(x))?)
    }

    /// Runs a VAE pass over `x` `[N, …]`: on the CPU one image at a time, elsewhere in one call.
    /// The VAE works at full resolution, where one image's activations (128 channels × H × W)
    /// already fill the caches and N of them only add allocator and memory-bandwidth cost; the
    /// results are the same either way (the VAE has no cross-image operation).
    fn one_image_at_a_time_on_cpu(
        &self,
        x: &Tensor,
        pass: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        if !self.device.is_cpu() || n == 1 {
            return pass(x);
        }
        let parts = (0..n).map(|i| pass(&x.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// Decodes final latents `[N, 4, h, w]` (before the scaling-factor division) into images,
    /// post-processed as diffusers does.
    ///
    /// # Errors
    /// Compute failures.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>, ModelError> {
        let scaled = (latents / self.vae.config().scaling_factor)?.to_dtype(self.dtype)?;
        let decoded = self.one_image_at_a_time_on_cpu(&scaled, |z| self.vae.decode(z))?.to_dtype(DType::F32)?;
        let (n, _, h, w) = decoded.dims4()?;
        let values = decoded.flatten_all()?.to_vec1::<f32>()?;
        let plane = h * w;
        Ok((0..n)
            .map(|i| {
                let item = &values[i * 3 * plane..(i + 1) * 3 * plane];
                let mut buf = vec![0u8; 3 * plane];
                for c in 0..3 {
                    for p in 0..plane {
                        buf[p * 3 + c] = to_u8(item[c * plane + p]);
                    }
                }
                RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer sized for the image; this is a bug")
            })
            .collect())
    }

    fn check_batch(&self, batch: &EditBatch) -> Result<(usize, usize), ModelError> {
        let first = batch.requests.first().ok_or_else(|| ModelError::InvalidInput("empty batch".into()))?;
        let (w, h) = first.image.dimensions();
        let f = self.info.size_multiple;
        if w == 0 || h == 0 || w % f != 0 || h % f != 0 {
            return Err(ModelError::InvalidInput(format!("image size {w}×{h} is not a positive multiple of {f}")));
        }
        if let Some(other) = batch.requests.iter().find(|r| r.image.dimensions() != (w, h)) {
            let (ow, oh) = other.image.dimensions();
            return Err(ModelError::InvalidInput(format!("batch mixes sizes {w}×{h} and {ow}×{oh}")));
        }
        for r in &batch.requests {
            if !(r.guidance_scale.is_finite() && r.image_guidance_scale.is_finite()) {
                return Err(ModelError::InvalidInput("guidance scales must be finite".into()));
            }
        }
        Ok(((h / f) as usize, (w / f) as usize))
    }

    /// Runs the pipeline on a batch. See the module docs for the algorithm.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for an inconsistent batch, [`ModelError::Cancelled`] when
    /// the observer cancels, [`ModelError::Compute`] when a tensor operation fails.
    pub fn run(&self, batch: &EditBatch, observer: &mut dyn EditObserver) -> Result<Vec<EditedImage>, ModelError> {
        self.run_with_scheduler_config(batch, &self.scheduler_config, observer)
    }

    /// [`Self::run`] with another scheduler config in place of the checkpoint's (as
    /// `X.from_config(config)`; the batch's `karras_sigmas` still overrides it); the parity
    /// tests use it for `timestep_spacing` variants.
    ///
    /// # Errors
    /// As [`Self::run`].
    pub fn run_with_scheduler_config(
        &self,
        batch: &EditBatch,
        scheduler_config: &Map<String, Value>,
        observer: &mut dyn EditObserver,
    ) -> Result<Vec<EditedImage>, ModelError> {
        let (lh, lw) = self.check_batch(batch)?;
        let requests = &batch.requests;
        let kind = batch.scheduler.or(self.info.default_scheduler).ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "the checkpoint's scheduler {:?} is not implemented; choose one of {}",
                self.scheduler_config.get("_class_name").and_then(Value::as_str).unwrap_or("(none)"),
                SchedulerKind::names()
            ))
        })?;
        let config = SchedulerConfig::resolve(kind, scheduler_config, batch.karras_sigmas)?;
        let schedule = Schedule::new(&config, batch.steps as usize)?;
        let latent_c = self.vae.config().latent_channels;
        let numel = latent_c * lh * lw;

        // 1. Text. Negative prompts only matter with guidance; each distinct one is encoded once.
        let guided: Vec<bool> =
            requests.iter().map(|r| r.guidance_scale > 1.0 && r.image_guidance_scale >= 1.0).collect();
        let mut encoded: Vec<(&str, Tensor)> = Vec::new();
        let mut negative_for: Vec<Option<Tensor>> = Vec::with_capacity(requests.len());
        for (r, &g) in requests.iter().zip(&guided) {
            if !g {
                negative_for.push(None);
                continue;
            }
            let text = r.negative_prompt.as_deref().unwrap_or("");
            let embedding = match encoded.iter().find(|(t, _)| *t == text) {
                Some((_, e)) => e.clone(),
                None => {
                    let e = self.encode_prompt(text)?.0;
                    encoded.push((text, e.clone()));
                    e
                }
            };
            negative_for.push(Some(embedding));
        }
        let mut prompts = Vec::with_capacity(requests.len());
        let mut truncated = Vec::with_capacity(requests.len());
        for r in requests {
            let (emb, cut) = self.encode_prompt(&r.instruction)?;
            prompts.push(emb);
            truncated.push(cut);
        }

        // 2. Image latents (unscaled posterior mean).
        let image_latents = self.encode_images(&requests.iter().map(|r| &r.image).collect::<Vec<_>>())?;

        // 3. Initial noise, one generator per image.
        let mut generators: Vec<TorchGenerator> = requests.iter().map(|r| TorchGenerator::new(r.seed)).collect();
        let mut initial = Vec::with_capacity(requests.len() * numel);
        for (r, g) in requests.iter().zip(generators.iter_mut()) {
            match &r.init_latents {
                Some(given) if given.len() == numel => initial.extend_from_slice(given),
                Some(given) => {
                    return Err(ModelError::InvalidInput(format!(
                        "init latents have {} values; expected [1, {latent_c}, {lh}, {lw}] = {numel}",
                        given.len()
                    )));
                }
                None => initial.extend(g.randn(numel)),
            }
        }
        let mut latents = (Tensor::from_vec(initial, (requests.len(), latent_c, lh, lw), &self.device)?
            * f64::from(schedule.init_noise_sigma()))?;

        // 4. Denoising. The conditioning rows of an image never change across steps; the
        // batch's rows are rebuilt only when the observer drops an image.
        let mut context_rows = Vec::with_capacity(requests.len());
        let mut condition_rows = Vec::with_capacity(requests.len());
        for (i, negative) in negative_for.iter().enumerate() {
            let img = image_latents.narrow(0, i, 1)?;
            let mut contexts = vec![prompts[i].clone()];
            let mut conditions = vec![img.clone()];
            if let Some(negative) = negative {
                contexts.extend([negative.clone(), negative.clone()]);
                conditions.extend([img.clone(), img.zeros_like()?]);
            }
            context_rows.push(contexts);
            condition_rows.push(conditions);
        }
        // The images still running, as indices into `requests`; row k of `latents` is image
        // `alive[k]`.
        let mut alive: Vec<usize> = (0..requests.len()).collect();
        let rows_of = |alive: &[usize]| -> candle_core::Result<(Tensor, Tensor)> {
            let contexts: Vec<&Tensor> = alive.iter().flat_map(|&i| &context_rows[i]).collect();
            let conditions: Vec<&Tensor> = alive.iter().flat_map(|&i| &condition_rows[i]).collect();
            Ok((Tensor::cat(&contexts, 0)?, Tensor::cat(&conditions, 0)?))
        };
        let (mut context, mut condition) = rows_of(&alive)?;

        let started = Instant::now();
        let total = schedule.timesteps().len();
        // The walk through the schedule: the step index and the multistep solvers' state.
        let mut sampler = schedule.sampler();
        for step in 0..=total {
            if observer.cancelled() {
                return Err(ModelError::Cancelled);
            }
            // Dropped images leave the batch: their rows go from the latents, the solver's
            // state and the conditioning; their generators are simply not drawn from again.
            let kept: Vec<u32> = (0..alive.len() as u32).filter(|&k| !observer.drop_image(alive[k as usize])).collect();
            if kept.len() < alive.len() {
                alive = kept.iter().map(|&k| alive[k as usize]).collect();
                if alive.is_empty() {
                    return Ok(Vec::new());
                }
                let kept = Tensor::new(kept.as_slice(), &self.device)?;
                latents = latents.index_select(&kept, 0)?;
                sampler.retain(&kept)?;
                (context, condition) = rows_of(&alive)?;
            }
            if step == total {
                break;
            }
            let t = sampler.timestep()?;
            let mut rows = Vec::with_capacity(context.dim(0)?);
            for (k, &i) in alive.iter().enumerate() {
                let x = latents.narrow(0, k, 1)?;
                rows.extend(std::iter::repeat_n(x, if guided[i] { 3 } else { 1 }));
            }
            let x = sampler.scale_model_input(&Tensor::cat(&rows, 0)?)?.to_dtype(self.dtype)?;
            let x = Tensor::cat(&[&x, &condition], 1)?;
            let eps_rows = self.unet.forward(&x, t, &context)?.to_dtype(DType::F32)?;

            let mut eps = Vec::with_capacity(alive.len());
            let mut row = 0;
            for &i in &alive {
                let r = &requests[i];
                if guided[i] {
                    let text = eps_rows.narrow(0, row, 1)?;
                    let image = eps_rows.narrow(0, row + 1, 1)?;
                    let uncond = eps_rows.narrow(0, row + 2, 1)?;
                    let guided_eps = ((&uncond + ((&text - &image)? * f64::from(r.guidance_scale))?)?
                        + ((&image - &uncond)? * f64::from(r.image_guidance_scale))?)?;
                    eps.push(guided_eps);
                    row += 3;
                } else {
                    eps.push(eps_rows.narrow(0, row, 1)?);
                    row += 1;
                }
            }
            let eps = Tensor::cat(&eps, 0)?;
            let noise = if schedule.draws_step_noise() {
                let mut data = Vec::with_capacity(alive.len() * numel);
                for &i in &alive {
                    data.extend(generators[i].randn(numel));
                }
                Some(Tensor::from_vec(data, latents.shape(), &self.device)?)
            } else {
                None
            };
            latents = sampler.step(&eps, &latents, noise.as_ref())?;
            observer.on_step(step + 1, total, started.elapsed());
        }

        // 5. Decode and post-process; 6. the safety checker, one image at a time.
        let images = self.decode(&latents)?;
        images
            .into_iter()
            .zip(alive)
            .map(|(mut image, i)| {
                let instruction_truncated = truncated[i];
                let nsfw_content_detected = match &self.safety_checker {
                    None => None,
                    Some(checker) => {
                        let report = checker.check(&image)?;
                        if report.nsfw {
                            tracing::warn!(concepts = ?report.bad_concepts, "the safety checker flagged an image; it is black");
                            image.as_mut().fill(0);
                        }
                        Some(report.nsfw)
                    }
                };
                Ok(EditedImage { image, instruction_truncated, nsfw_content_detected })
            })
            .collect()
    }
}

/// diffusers' `postprocess` for one value: `(x/2 + 0.5)`, clamp to [0, 1], ×255, round half
/// to even (numpy's rule).
fn to_u8(x: f32) -> u8 {
    let v = (x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
    if v.is_nan() { 0 } else { v.round_ties_even() as u8 }
}

impl Editor for InstructPix2Pix {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn edit(&self, batch: &EditBatch, observer: &mut dyn EditObserver) -> Result<Vec<EditedImage>, EditError> {
        self.run(batch, observer).map_err(|e| EditError {
            kind: match e {
                ModelError::InvalidInput(_) | ModelError::UnsupportedConfig { .. } => EditErrorKind::InvalidInput,
                ModelError::Cancelled => EditErrorKind::Cancelled,
                _ => EditErrorKind::Model,
            },
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::to_u8;

    #[test]
    fn postprocess_rounds_half_to_even_and_clamps() {
        assert_eq!(to_u8(-2.0), 0);
        assert_eq!(to_u8(2.0), 255);
        assert_eq!(to_u8(0.0), 128); // 127.5 → 128 (even)
        // 0.5·255 + … = 126.5 exactly → 126 (even), where round-half-up gives 127.
        let x = (126.5f32 / 255.0 - 0.5) * 2.0;
        assert_eq!(to_u8(x), ((x / 2.0 + 0.5) * 255.0).round_ties_even() as u8);
        assert_eq!(to_u8(f32::NAN), 0);
    }
}
