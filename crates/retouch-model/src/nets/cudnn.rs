//! Convolutions through cuDNN (feature `cudnn`), as a candle custom op.
//!
//! candle's own cuDNN convolution (its `cudnn` feature) creates every descriptor, runs cuDNN's
//! algorithm heuristic and allocates a zeroed workspace on every call, never sets a math type,
//! and accumulates f16 convolutions in f16. This op instead, per thread and device:
//!
//! * keeps one **plan per convolution shape** (input shape, channels, kernel, padding, stride,
//!   dtype): the tensor, filter and convolution descriptors and the forward algorithm, chosen
//!   once by cuDNN's heuristic (`cudnnGetConvolutionForwardAlgorithm_v7`) — a UNet call meets
//!   about 20 distinct shapes, then only reuses them;
//! * accumulates in **float32** for f16/bf16 data ("pseudo-half" configuration, as PyTorch
//!   does) and allows **tensor cores** (`CUDNN_TENSOR_OP_MATH`); float32 data uses
//!   `CUDNN_FMA_MATH`, i.e. no TF32, so `--dtype f32` keeps full precision;
//! * reuses **one workspace** per device, grown to the largest plan's need.
//!
//! Only library calls: no kernel of ours runs on the GPU. The bias is added by the caller
//! (`super::conv`), as candle's convolution does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::{ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor, sys};
use half::{bf16, f16};

/// `conv2d(x, weight)` without bias through cuDNN: `x` `[B, C, H, W]` and `weight`
/// `[C_out, C, k, k]`, contiguous, on one CUDA device, in f16, bf16 or f32.
///
/// # Errors
/// Any cuDNN or CUDA error, with the call that failed.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    x.apply_op2_no_bwd(weight, &CudnnConv2d { padding, stride })
}

/// The custom op: padding and stride; shapes come from the operands.
struct CudnnConv2d {
    padding: usize,
    stride: usize,
}

/// What identifies a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    dtype: DType,
    /// `[B, C, H, W]`.
    input: [usize; 4],
    /// `[C_out, C, k, k]`.
    filter: [usize; 4],
    padding: usize,
    stride: usize,
}

/// The descriptors and algorithm of one convolution shape.
struct Plan<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algorithm: sys::cudnnConvolutionFwdAlgo_t,
    workspace_bytes: usize,
    output: [usize; 4],
}

/// Everything this thread keeps for cuDNN. cuDNN handles and descriptors are neither `Send`
/// nor `Sync`, so they live with the thread that runs the model (one per model).
#[derive(Default)]
struct ThreadState {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    workspaces: HashMap<DeviceId, CudaSlice<u8>>,
    f16: HashMap<PlanKey, Plan<f16>>,
    bf16: HashMap<PlanKey, Plan<bf16>>,
    f32: HashMap<PlanKey, Plan<f32>>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// A data type this op runs, with its math mode and its plan table.
trait Element: CudnnDataType + CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    /// Tensor cores (f16/bf16, float32 accumulation) or plain FMA (f32: no TF32).
    const MATH: sys::cudnnMathType_t;
    fn plans(state: &mut ThreadState) -> &mut HashMap<PlanKey, Plan<Self>>;
    fn one() -> Self;
    fn zero() -> Self;
}

impl Element for f16 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    fn plans(state: &mut ThreadState) -> &mut HashMap<PlanKey, Plan<Self>> {
        &mut state.f16
    }
    fn one() -> Self {
        f16::ONE
    }
    fn zero() -> Self {
        f16::ZERO
    }
}

impl Element for bf16 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    fn plans(state: &mut ThreadState) -> &mut HashMap<PlanKey, Plan<Self>> {
        &mut state.bf16
    }
    fn one() -> Self {
        bf16::ONE
    }
    fn zero() -> Self {
        bf16::ZERO
    }
}

impl Element for f32 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_FMA_MATH;
    fn plans(state: &mut ThreadState) -> &mut HashMap<PlanKey, Plan<Self>> {
        &mut state.f32
    }
    fn one() -> Self {
        1.0
    }
    fn zero() -> Self {
        0.0
    }
}

fn cudnn_err(call: &'static str) -> impl Fn(cudarc::cudnn::CudnnError) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("cuDNN {call}: {e:?}"))
}

fn as_i32(dims: [usize; 4]) -> Result<[i32; 4]> {
    let mut out = [0i32; 4];
    for (o, d) in out.iter_mut().zip(dims) {
        *o = i32::try_from(d).map_err(|_| candle_core::Error::Msg(format!("cuDNN: dimension {d} exceeds i32")))?;
    }
    Ok(out)
}

impl<T: Element> Plan<T> {
    fn new(handle: &Arc<Cudnn>, key: &PlanKey) -> Result<Self> {
        let [b, _, h, w] = key.input;
        let [c_out, _, k, _] = key.filter;
        let (p, s) = (key.padding, key.stride);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: input {h}×{w} is smaller than the {k}×{k} kernel");
        }
        let output = [b, c_out, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1];
        let (pi, si) = (p as i32, s as i32);
        let mut conv = handle
            .create_conv2d::<f32>([pi, pi], [si, si], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(cudnn_err("create_conv2d"))?;
        conv.set_math_type(T::MATH).map_err(cudnn_err("set_math_type"))?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = handle.create_4d_tensor::<T>(nchw, as_i32(key.input)?).map_err(cudnn_err("create_4d_tensor(x)"))?;
        let w = handle.create_4d_filter::<T>(nchw, as_i32(key.filter)?).map_err(cudnn_err("create_4d_filter"))?;
        let y = handle.create_4d_tensor::<T>(nchw, as_i32(output)?).map_err(cudnn_err("create_4d_tensor(y)"))?;
        let forward = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
        let algorithm = forward.pick_algorithm().map_err(cudnn_err("get_convolution_forward_algorithm_v7"))?;
        let workspace_bytes =
            forward.get_workspace_size(algorithm).map_err(cudnn_err("get_convolution_forward_workspace_size"))?;
        tracing::debug!(?key, ?algorithm, workspace_bytes, "cuDNN convolution plan");
        Ok(Self { conv, x, w, y, algorithm, workspace_bytes, output })
    }
}

fn run<T: Element>(
    op: &CudnnConv2d,
    x: &CudaStorage,
    x_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev: CudaDevice = x.device().clone();
    let (Some((x0, x1)), Some((w0, w1))) = (x_layout.contiguous_offsets(), w_layout.contiguous_offsets()) else {
        candle_core::bail!("cuDNN conv2d takes contiguous operands");
    };
    let input: [usize; 4] =
        x_layout.dims().try_into().map_err(|_| candle_core::Error::Msg("conv2d input is not 4-D".into()))?;
    let filter: [usize; 4] =
        w_layout.dims().try_into().map_err(|_| candle_core::Error::Msg("conv2d weight is not 4-D".into()))?;
    if input[1] != filter[1] || filter[2] != filter[3] {
        candle_core::bail!("conv2d: input {input:?} does not fit weight {filter:?}");
    }
    let key = PlanKey { device: dev.id(), dtype: x.dtype(), input, filter, padding: op.padding, stride: op.stride };
    let x_slice = x.as_cuda_slice::<T>()?.slice(x0..x1);
    let w_slice = w.as_cuda_slice::<T>()?.slice(w0..w1);
    STATE.with(|state| -> Result<(CudaStorage, Shape)> {
        let mut state = state.borrow_mut();
        let handle = match state.handles.get(&key.device) {
            Some(h) => h.clone(),
            None => {
                let h = Cudnn::new(dev.cuda_stream()).map_err(cudnn_err("create handle"))?;
                state.handles.insert(key.device, h.clone());
                h
            }
        };
        if !T::plans(&mut state).contains_key(&key) {
            let plan = Plan::<T>::new(&handle, &key)?;
            T::plans(&mut state).insert(key, plan);
        }
        let (output, workspace_bytes) = {
            let plan = &T::plans(&mut state)[&key];
            (plan.output, plan.workspace_bytes)
        };
        let too_small = state.workspaces.get(&key.device).is_none_or(|ws| ws.len() < workspace_bytes);
        if too_small && workspace_bytes > 0 {
            state.workspaces.remove(&key.device);
            state.workspaces.insert(key.device, dev.alloc_zeros::<u8>(workspace_bytes)?);
        }
        // SAFETY: every element is written by the convolution (beta = 0).
        #[allow(unsafe_code)]
        let mut y = unsafe { dev.alloc::<T>(output.iter().product())? };
        let ThreadState { workspaces, .. } = &mut *state;
        let mut workspace = workspaces.remove(&key.device);
        let plan = &T::plans(&mut state)[&key];
        let forward = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
        // SAFETY: the descriptors were made for exactly these shapes and this dtype (the plan
        // key), the slices are contiguous and live for the call, and the workspace holds at
        // least `workspace_bytes`.
        #[allow(unsafe_code)]
        let launched = unsafe {
            forward.launch(
                plan.algorithm,
                workspace.as_mut().filter(|_| workspace_bytes > 0),
                (T::one(), T::zero()),
                &x_slice,
                &w_slice,
                &mut y,
            )
        };
        if let Some(ws) = workspace {
            state.workspaces.insert(key.device, ws);
        }
        launched.map_err(cudnn_err("convolution_forward"))?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(output.to_vec())))
    })
}

impl CustomOp2 for CudnnConv2d {
    fn name(&self) -> &'static str {
        "retouch-cudnn-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution runs on CUDA devices only; this is a bug")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match (x.dtype(), w.dtype()) {
            (DType::F16, DType::F16) => run::<f16>(self, x, x_layout, w, w_layout),
            (DType::BF16, DType::BF16) => run::<bf16>(self, x, x_layout, w, w_layout),
            (DType::F32, DType::F32) => run::<f32>(self, x, x_layout, w, w_layout),
            (a, b) => candle_core::bail!("cuDNN conv2d: unsupported dtypes {a:?} × {b:?}"),
        }
    }
}
