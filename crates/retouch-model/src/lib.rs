//! InstructPix2Pix on candle, numerically faithful to diffusers.
//!
//! * [`source`]: where a checkpoint comes from — a directory or the Hugging Face Hub cache.
//! * [`config`]: diffusers/transformers `config.json` → typed configs, strictly.
//! * [`weights`]: memory-mapped safetensors (or `.bin`) with a ledger of used tensors.
//! * [`tokenizer`]: the CLIP BPE tokenizer from `vocab.json` + `merges.txt`.
//! * [`nets`]: text encoder, UNet, VAE.
//! * [`scheduler`]: Euler-ancestral, Euler and DDIM as diffusers computes them.
//! * [`rng`]: torch's CPU generator, so seeds reproduce diffusers' noise.
//! * [`pipeline`]: the batched edit, implementing [`retouch_core::editor::Editor`].
//! * [`safety`]: diffusers' safety checker (CLIP preprocessing, vision tower, decision).
//! * [`device`]: CPU or CUDA; [`compute_cap`] guards CUDA builds against GPUs they have no
//!   kernels for; [`kernels`] picks the convolution and attention implementations (cuDNN and
//!   flash attention on GPUs, oneDNN's bf16 products on CPUs: [`onednn`]).

pub mod config;
pub mod device;
pub mod error;
pub mod kernels;
pub mod nets;
pub mod onednn;
pub mod pipeline;
pub mod rng;
pub mod safety;
pub mod scheduler;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub mod compute_cap;

pub use device::DeviceSpec;
pub use error::ModelError;
pub use kernels::{AttentionChoice, ConvChoice, KernelChoice, Kernels};
pub use pipeline::{InstructPix2Pix, LoadOptions};
pub use source::ModelSource;
