//! The model seam: a synchronous [`Editor`] that edits a batch of same-size images.
//!
//! The editor is owned by exactly one OS thread (inference is blocking and, on a GPU, bound to
//! one device context); everything asynchronous reaches it through a channel. Plain data in,
//! plain data out: no tokio, no candle here.

use std::time::Duration;

use image::RgbImage;

use crate::params::SchedulerKind;

/// One image of a batch.
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// The prepared input (see [`crate::imaging`]): its size is a multiple of the model's
    /// factor and equals every other request's in the batch.
    pub image: RgbImage,
    /// The instruction ("make it snowy").
    pub instruction: String,
    /// Replaces the empty prompt of the two unconditional guidance branches (diffusers'
    /// `negative_prompt`); `None` is the empty prompt. Unused when guidance is off.
    pub negative_prompt: Option<String>,
    /// Seed of this image's own noise generator.
    pub seed: u64,
    /// Text guidance scale.
    pub guidance_scale: f32,
    /// Image guidance scale.
    pub image_guidance_scale: f32,
    /// Unscaled initial noise `[1, 4, H/f, W/f]` (row-major) to use instead of the seeded
    /// draw; the scheduler's `init_noise_sigma` multiplies it (diffusers' `latents=`).
    pub init_latents: Option<Vec<f32>>,
}

/// Images edited together: one UNet pass per step for the whole batch.
#[derive(Clone, Debug)]
pub struct EditBatch {
    /// Denoising steps, shared.
    pub steps: u32,
    /// Sampler, shared; `None` = the checkpoint's own.
    pub scheduler: Option<SchedulerKind>,
    /// Karras sigmas (`use_karras_sigmas`), shared; `None` = as the checkpoint's scheduler
    /// config says.
    pub karras_sigmas: Option<bool>,
    /// The images, all of one size.
    pub requests: Vec<EditRequest>,
}

/// One edited image.
#[derive(Clone, Debug)]
pub struct EditedImage {
    /// The result, of the input's size.
    pub image: RgbImage,
    /// The instruction was longer than the text encoder's 77 tokens and was cut.
    pub instruction_truncated: bool,
    /// The safety checker's verdict (diffusers' `nsfw_content_detected`): `None` when no checker
    /// ran, `Some(true)` when it flagged the image — which is then all black, as in diffusers.
    pub nsfw_content_detected: Option<bool>,
}

/// Progress callbacks from inside [`Editor::edit`], on the editor's thread.
pub trait EditObserver {
    /// Called after each denoising step (`step` counts from 1).
    fn on_step(&mut self, step: usize, total: usize, elapsed: Duration);
    /// Polled between steps; `true` aborts the edit with [`EditErrorKind::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
    /// Polled before each denoising step, and before decoding, for every image still running
    /// (`index` into the batch's requests): `true` drops that image now. The editor stops
    /// computing it and returns no result for it; the other images' results are unchanged,
    /// bit for bit (each depends only on its own request).
    fn drop_image(&mut self, index: usize) -> bool {
        let _ = index;
        false
    }
}

/// An observer that ignores progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl EditObserver for NoProgress {
    fn on_step(&mut self, _: usize, _: usize, _: Duration) {}
}

/// What kind of failure an edit hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditErrorKind {
    /// The batch itself is invalid (sizes differ, bad latents shape, unsupported scheduler):
    /// retrying will not help.
    InvalidInput,
    /// The model failed (out of memory, device error, a panic): may succeed alone or later.
    Model,
    /// The observer asked to stop (shutdown).
    Cancelled,
    /// The call ran past its deadline.
    Timeout,
    /// The model is not there to run it (the model thread stopped or never loaded).
    Unavailable,
}

/// An edit failure.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct EditError {
    /// Classification that drives retry decisions.
    pub kind: EditErrorKind,
    /// Human-readable cause.
    pub message: String,
}

/// Static facts about a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Where the model came from (`hf:timbrooks/instruct-pix2pix`, a path…).
    pub name: String,
    /// Device it runs on (`cpu`, `cuda:0`).
    pub device: String,
    /// Weight dtype (`f32`, `f16`).
    pub dtype: String,
    /// Input sides must be multiples of this (the VAE's downsampling factor).
    pub size_multiple: u32,
    /// The scheduler the checkpoint ships, if implemented.
    pub default_scheduler: Option<SchedulerKind>,
}

/// An InstructPix2Pix model (or a test double).
pub trait Editor: Send {
    /// Facts about the model.
    fn info(&self) -> &ModelInfo;

    /// Edits every image of `batch`; results are in the same order, one per request that the
    /// observer did not drop ([`EditObserver::drop_image`]). Each result depends only on its
    /// own request, never on what else shares the batch.
    ///
    /// # Errors
    /// [`EditError`], classified for retries.
    fn edit(&self, batch: &EditBatch, observer: &mut dyn EditObserver) -> Result<Vec<EditedImage>, EditError>;
}
