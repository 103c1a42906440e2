//! oneDNN — the kernel library PyTorch uses on x86 CPUs — for the CPU's matrix products:
//! convolutions, the attention blocks' linear layers and attention itself, in f32 (the default
//! when the library is installed) or bf16 (`--dtype bf16`: bf16 inputs and weights, float32
//! accumulation and output, on AVX512-BF16 dot products or AMX tiles).
//!
//! * **Opened at run time.** `libdnnl.so.2` (oneDNN 2.x; Debian/Ubuntu package `libdnnl2`) is
//!   loaded with `dlopen` when the first CPU model loads, so the binary runs without it. A missing
//!   library, another major version, or (for bf16) a CPU without AVX512-BF16 is a
//!   [`ModelError::Device`] naming what to do.
//! * **Weights** are converted and reordered once, at load, into the blocked layout the kernel
//!   oneDNN picks wants. An input shape whose kernel wants another layout gets its own copy,
//!   reordered from the first on first use and kept.
//! * **Activations stay float32** between products (norms, element-wise ops, the sampler): each
//!   product converts its input in one reorder pass and writes float32 — PyTorch's CPU autocast
//!   makes the same split. Attention scores and softmax inputs are float32 too.
//! * **Batch invariance**: every image (convolution, attention) or sequence (linear layer) of a
//!   batch is its own call of one primitive built for that shape, so a batch's results are the
//!   same bits as each image alone; the conversions around the calls are element-wise.
//! * **Threads**: oneDNN runs on its OpenMP pool, sized to candle's thread count when the
//!   library opens (`retouch --threads`; the binary sets OpenMP's wait policy, see its `main`).
//!   Each thread executes with its own scratchpad, so several threads may run primitives at once.
//!
//! The C API used is oneDNN 2.x's (`dnnl_*_desc_init` + `dnnl_primitive_desc_create`); the
//! descriptors are opaque buffers of the 2.x sizes, checked against the library's version.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Error, Result};

use crate::error::ModelError;

/// The library file opened (oneDNN 2.x's soname).
pub const LIBRARY: &str = "libdnnl.so.2";

type Handle = *mut c_void;

/// `dnnl_memory_desc_t` of oneDNN 2.x: 696 bytes, only ever filled and read by the library.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct MemoryDesc([u8; 696]);

impl MemoryDesc {
    const fn zeroed() -> Self {
        Self([0; 696])
    }
}

/// Room for an operation descriptor (`dnnl_matmul_desc_t` is 2800 bytes, a convolution's 5976).
#[repr(C, align(8))]
struct OpDesc([u8; 8192]);

/// `dnnl_exec_arg_t`.
#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

/// `dnnl_version_t`.
#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}

// oneDNN 2.x constants (dnnl_types.h).
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
const ARG_BIAS: c_int = 41;
const F32: c_int = 3;
const BF16: c_int = 2;
const TAG_ANY: c_int = 1;
const TAG_A: c_int = 2;
const TAG_AB: c_int = 3;
const TAG_BA: c_int = 22;
const TAG_NCHW: c_int = 5;
const TAG_NHWC: c_int = 20;
/// `dnnl_acbd`: dims `[a, b, c, d]` stored in the order a, c, b, d.
const TAG_ACBD: c_int = 6;
const ENGINE_CPU: c_int = 1;
const FORWARD_INFERENCE: c_int = 96;
const CONVOLUTION_DIRECT: c_int = 1;
const QUERY_WEIGHTS_MD: c_int = 131;
const QUERY_IMPL_INFO_STR: c_int = 8;
const QUERY_SCRATCHPAD_MD: c_int = 136;
const ARG_SCRATCHPAD: c_int = 80;
/// `dnnl_scratchpad_mode_user`: the caller passes each execution its scratch memory.
const SCRATCHPAD_USER: c_int = 1;
const SOFTMAX_ACCURATE: c_int = 0x30000;
const STREAM_DEFAULT_FLAGS: c_uint = 1;
/// `dnnl_cpu_isa_avx512_core_bf16`: the ISA bits a CPU needs for bf16 dot products.
const ISA_AVX512_CORE_BF16: c_int = 0xe7;
/// `dnnl_cpu_isa_avx512_core_amx`.
const ISA_AVX512_CORE_AMX: c_int = 0x3e7;

/// The library's entry points used after it is opened.
struct Api {
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> c_int,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_uint) -> c_int,
    md_init_by_tag: unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, c_int) -> c_int,
    md_equal: unsafe extern "C" fn(*const MemoryDesc, *const MemoryDesc) -> c_int,
    softmax_desc_init:
        unsafe extern "C" fn(*mut OpDesc, c_int, c_int, *const MemoryDesc, *const MemoryDesc, c_int) -> c_int,
    attr_create: unsafe extern "C" fn(*mut Handle) -> c_int,
    attr_destroy: unsafe extern "C" fn(Handle) -> c_int,
    attr_set_output_scales: unsafe extern "C" fn(Handle, i64, c_int, *const f32) -> c_int,
    attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> c_int,
    md_get_size: unsafe extern "C" fn(*const MemoryDesc) -> usize,
    matmul_desc_init: unsafe extern "C" fn(
        *mut OpDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> c_int,
    conv_desc_init: unsafe extern "C" fn(
        *mut OpDesc,
        c_int,
        c_int,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const i64,
        *const i64,
        *const i64,
    ) -> c_int,
    reorder_pd_create:
        unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, *const MemoryDesc, Handle, Handle) -> c_int,
    pd_create: unsafe extern "C" fn(*mut Handle, *const OpDesc, Handle, Handle, Handle) -> c_int,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> c_int,
    pd_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const MemoryDesc,
    pd_destroy: unsafe extern "C" fn(Handle) -> c_int,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> c_int,
    primitive_destroy: unsafe extern "C" fn(Handle) -> c_int,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> c_int,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, *mut c_void) -> c_int,
    memory_destroy: unsafe extern "C" fn(Handle) -> c_int,
    memory_get_data_handle: unsafe extern "C" fn(Handle, *mut *mut c_void) -> c_int,
    /// The CPU engine every object is created on.
    engine: Handle,
    /// What the library reports about itself and the CPU, for logs and errors.
    description: String,
    /// The instruction set oneDNN uses on this CPU (`dnnl_cpu_isa_t`).
    isa: c_int,
}

// SAFETY: the engine is immutable after creation and oneDNN's C API is thread-safe for
// creating objects on it and executing primitives; the rest are function pointers.
#[allow(unsafe_code)]
unsafe impl Send for Api {}
#[allow(unsafe_code)]
unsafe impl Sync for Api {}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

/// Opens oneDNN (once per process) and checks that this CPU can run bf16 products with it.
///
/// # Errors
/// [`ModelError::Device`] when the library is missing or of another major version, or the CPU
/// lacks AVX512-BF16, each saying what to do instead.
pub fn ensure_available() -> std::result::Result<&'static str, ModelError> {
    let api = api().map_err(|e| ModelError::Device(e.to_string()))?;
    if api.isa & ISA_AVX512_CORE_BF16 != ISA_AVX512_CORE_BF16 {
        return Err(ModelError::Device(format!(
            "bf16 on the CPU needs AVX512-BF16 (Intel Xeon Cooper Lake / Sapphire Rapids or later, AMD \
             Zen 4 or later); this CPU offers {}. Use --dtype f32",
            isa_name(api.isa)
        )));
    }
    Ok(api.description.as_str())
}

/// Opens oneDNN (once per process) for its f32 products (`--conv onednn`).
///
/// # Errors
/// [`ModelError::Device`] when the library is missing or of another major version.
pub fn ensure_library() -> std::result::Result<&'static str, ModelError> {
    api().map(|api| api.description.as_str()).map_err(|e| ModelError::Device(e.to_string()))
}

fn api() -> Result<&'static Api> {
    API.get_or_init(|| open(LIBRARY)).as_ref().map_err(|e| Error::Msg(e.clone()))
}

/// The name of a oneDNN CPU ISA value.
fn isa_name(isa: c_int) -> &'static str {
    match isa {
        ISA_AVX512_CORE_AMX => "AVX-512 with AMX",
        ISA_AVX512_CORE_BF16 => "AVX-512 with AVX512-BF16",
        0x67 => "AVX-512 with VNNI (no bf16)",
        0x27 => "AVX-512 (no bf16)",
        0x407 => "AVX2 with VNNI (no bf16)",
        0x7 => "AVX2 (no bf16)",
        _ => "no AVX512-BF16",
    }
}

fn open(path: &str) -> std::result::Result<Api, String> {
    let c_path = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the signature of
    // oneDNN 2.x's C API (dnnl.h), which `version` below confirms before any other call.
    #[allow(unsafe_code)]
    unsafe {
        let lib = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            let why = CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned();
            return Err(format!(
                "bf16 on the CPU (and --conv onednn) runs on oneDNN 2.x, which is not installed \
                 ({why}); install it (Debian/Ubuntu: `apt-get install libdnnl2`) or use --dtype f32"
            ));
        }
        macro_rules! sym {
            ($name:literal) => {
                symbol(lib, concat!($name, "\0"), path)?
            };
        }
        let version: unsafe extern "C" fn() -> *const Version = sym!("dnnl_version");
        let v = &*version();
        if v.major != 2 {
            return Err(format!(
                "{path} is oneDNN {}.{}.{}; retouch's oneDNN path is written against oneDNN 2.x",
                v.major, v.minor, v.patch
            ));
        }
        let effective_cpu_isa: unsafe extern "C" fn() -> c_int = sym!("dnnl_get_effective_cpu_isa");
        let isa = effective_cpu_isa();
        let omp = libc::dlsym(lib, c"omp_set_num_threads".as_ptr());
        let mut api = Api {
            engine_create: sym!("dnnl_engine_create"),
            stream_create: sym!("dnnl_stream_create"),
            md_init_by_tag: sym!("dnnl_memory_desc_init_by_tag"),
            md_equal: sym!("dnnl_memory_desc_equal"),
            softmax_desc_init: sym!("dnnl_softmax_v2_forward_desc_init"),
            attr_create: sym!("dnnl_primitive_attr_create"),
            attr_destroy: sym!("dnnl_primitive_attr_destroy"),
            attr_set_output_scales: sym!("dnnl_primitive_attr_set_output_scales"),
            attr_set_scratchpad_mode: sym!("dnnl_primitive_attr_set_scratchpad_mode"),
            md_get_size: sym!("dnnl_memory_desc_get_size"),
            matmul_desc_init: sym!("dnnl_matmul_desc_init"),
            conv_desc_init: sym!("dnnl_convolution_forward_desc_init"),
            reorder_pd_create: sym!("dnnl_reorder_primitive_desc_create"),
            pd_create: sym!("dnnl_primitive_desc_create"),
            pd_query: sym!("dnnl_primitive_desc_query"),
            pd_query_md: sym!("dnnl_primitive_desc_query_md"),
            pd_destroy: sym!("dnnl_primitive_desc_destroy"),
            primitive_create: sym!("dnnl_primitive_create"),
            primitive_destroy: sym!("dnnl_primitive_destroy"),
            primitive_execute: sym!("dnnl_primitive_execute"),
            memory_create: sym!("dnnl_memory_create"),
            memory_destroy: sym!("dnnl_memory_destroy"),
            memory_get_data_handle: sym!("dnnl_memory_get_data_handle"),
            engine: std::ptr::null_mut(),
            description: format!("oneDNN {}.{}.{}, {}", v.major, v.minor, v.patch, isa_name(isa)),
            isa,
        };
        let status = (api.engine_create)(&mut api.engine, ENGINE_CPU, 0);
        if status != 0 {
            return Err(format!("oneDNN could not create a CPU engine ({})", status_name(status)));
        }
        // OpenMP (a dependency of the library) sizes oneDNN's pool; candle's count is --threads.
        if !omp.is_null() {
            let set_threads = std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(omp);
            set_threads(candle_core::utils::get_num_threads() as c_int);
        }
        tracing::info!(library = %api.description, "oneDNN opened for the CPU's matrix products");
        Ok(api)
    }
}

/// The entry point `name` (NUL-terminated) of `lib` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the symbol's C signature as a function pointer type.
#[allow(unsafe_code)]
unsafe fn symbol<F: Copy>(lib: *mut c_void, name: &str, path: &str) -> std::result::Result<F, String> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: `name` is NUL-terminated; the caller vouches for `F`.
    unsafe {
        let p = libc::dlsym(lib, name.as_ptr().cast());
        if p.is_null() {
            return Err(format!("{path} has no `{}`: not oneDNN 2.x", name.trim_end_matches('\0')));
        }
        Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
    }
}

fn status_name(status: c_int) -> &'static str {
    match status {
        1 => "out of memory",
        2 => "invalid arguments",
        3 => "unimplemented",
        5 => "runtime error",
        _ => "error",
    }
}

fn check(status: c_int, what: &str) -> Result<()> {
    if status == 0 { Ok(()) } else { Err(Error::Msg(format!("oneDNN {what}: {}", status_name(status)))) }
}

/// A memory descriptor for `dims` of `data_type` in layout `tag`.
fn md(api: &Api, dims: &[i64], data_type: c_int, tag: c_int) -> Result<MemoryDesc> {
    let mut md = MemoryDesc::zeroed();
    // SAFETY: `md` is a 2.x-sized descriptor; `dims` holds `dims.len()` values.
    #[allow(unsafe_code)]
    let status = unsafe { (api.md_init_by_tag)(&mut md, dims.len() as c_int, dims.as_ptr(), data_type, tag) };
    check(status, "memory descriptor")?;
    Ok(md)
}

/// The data type the products multiply in; accumulation and output are float32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// bf16 inputs and weights (`--dtype bf16`).
    Bf16,
    /// float32 inputs and weights (`--conv onednn` in f32).
    F32,
}

impl Precision {
    fn data_type(self) -> c_int {
        match self {
            Self::Bf16 => BF16,
            Self::F32 => F32,
        }
    }

    /// How logs, bench JSON and error texts name a backend running in this precision.
    pub fn backend_name(self) -> &'static str {
        match self {
            Self::Bf16 => "onednn-bf16",
            Self::F32 => "onednn-f32",
        }
    }

    /// Bytes per value.
    fn bytes(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }
}

/// A primitive and its descriptor.
///
/// Every primitive is created with a user-managed scratchpad: oneDNN's default shares one
/// scratchpad between all primitives, which corrupts results when two threads execute at once
/// (two models, or tests, in one process); each execution here gets its thread's own buffer.
struct Primitive {
    pd: Handle,
    primitive: Handle,
    /// The scratch memory an execution needs (size 0: none).
    scratchpad: MemoryDesc,
    /// Its size in bytes.
    scratchpad_bytes: usize,
}

// SAFETY: oneDNN primitives may be executed from several threads at once; nothing mutates
// them after creation.
#[allow(unsafe_code)]
unsafe impl Send for Primitive {}
#[allow(unsafe_code)]
unsafe impl Sync for Primitive {}

impl Primitive {
    /// Takes ownership of `pd` (destroyed on failure) and creates its primitive.
    fn from_pd(api: &Api, pd: Handle) -> Result<Self> {
        let mut primitive = std::ptr::null_mut();
        // SAFETY: `pd` is a live primitive descriptor owned by us.
        #[allow(unsafe_code)]
        let status = unsafe { (api.primitive_create)(&mut primitive, pd) };
        if status != 0 {
            #[allow(unsafe_code)]
            // SAFETY: `pd` is ours and not used again.
            unsafe {
                (api.pd_destroy)(pd);
            }
        }
        check(status, "primitive")?;
        // SAFETY: `pd` is live; the descriptor is copied at once.
        #[allow(unsafe_code)]
        let scratchpad = unsafe {
            let md = (api.pd_query_md)(pd, QUERY_SCRATCHPAD_MD, 0);
            if md.is_null() { MemoryDesc::zeroed() } else { *md }
        };
        // SAFETY: an initialised (or zero, i.e. empty) descriptor.
        #[allow(unsafe_code)]
        let scratchpad_bytes = unsafe { (api.md_get_size)(&scratchpad) };
        Ok(Self { pd, primitive, scratchpad, scratchpad_bytes })
    }

    /// Attributes asking for a user-managed scratchpad (and `scale` on the output); the caller
    /// destroys them.
    fn attributes(api: &Api, scale: Option<f32>) -> Result<Handle> {
        let mut attr = std::ptr::null_mut();
        // SAFETY: a fresh attribute object, destroyed here on failure.
        #[allow(unsafe_code)]
        unsafe {
            check((api.attr_create)(&mut attr), "attributes")?;
            let mut status = (api.attr_set_scratchpad_mode)(attr, SCRATCHPAD_USER);
            if let (0, Some(scale)) = (status, scale) {
                status = (api.attr_set_output_scales)(attr, 1, 0, &scale);
            }
            if status != 0 {
                (api.attr_destroy)(attr);
                check(status, "attributes")?;
            }
        }
        Ok(attr)
    }

    /// The descriptor of a primitive for `op`.
    fn create(api: &Api, op: &OpDesc) -> Result<Self> {
        Self::create_scaled(api, op, None)
    }

    /// The primitive for `op`, its output multiplied by `scale` when given.
    fn create_scaled(api: &Api, op: &OpDesc, scale: Option<f32>) -> Result<Self> {
        let mut pd = std::ptr::null_mut();
        let attr = Self::attributes(api, scale)?;
        // SAFETY: `op` was filled by a `*_desc_init` call; the attributes are ours and destroyed
        // after the descriptor copied them; no hint.
        #[allow(unsafe_code)]
        let status = unsafe {
            let status = (api.pd_create)(&mut pd, op, attr, api.engine, std::ptr::null_mut());
            (api.attr_destroy)(attr);
            status
        };
        check(status, "primitive descriptor")?;
        Self::from_pd(api, pd)
    }

    /// A reorder (layout and/or type conversion) from `src` to `dst`.
    fn reorder(api: &Api, src: &MemoryDesc, dst: &MemoryDesc) -> Result<Self> {
        let mut pd = std::ptr::null_mut();
        let attr = Self::attributes(api, None)?;
        // SAFETY: both descriptors are initialised; one engine for both sides; the attributes
        // are ours, destroyed once copied.
        #[allow(unsafe_code)]
        let status = unsafe {
            let status = (api.reorder_pd_create)(&mut pd, src, api.engine, dst, api.engine, attr);
            (api.attr_destroy)(attr);
            status
        };
        check(status, "reorder")?;
        Self::from_pd(api, pd)
    }

    /// The layout this primitive wants its weights in.
    fn weights_md(&self, api: &Api) -> Result<MemoryDesc> {
        // SAFETY: `pd` is live; the returned pointer lives as long as it and is copied at once.
        #[allow(unsafe_code)]
        let md = unsafe { (api.pd_query_md)(self.pd, QUERY_WEIGHTS_MD, 0) };
        if md.is_null() {
            return Err(Error::Msg("oneDNN: the primitive has no weights".into()));
        }
        #[allow(unsafe_code)]
        // SAFETY: non-null, points at a 2.x memory descriptor.
        Ok(unsafe { *md })
    }

    /// The implementation oneDNN picked (e.g. `brg:avx512_core_amx_bf16`).
    fn implementation(&self, api: &Api) -> String {
        let mut info: *const c_char = std::ptr::null();
        // SAFETY: the query writes a pointer to a NUL-terminated string owned by `pd`.
        #[allow(unsafe_code)]
        unsafe {
            if (api.pd_query)(self.pd, QUERY_IMPL_INFO_STR, 0, (&mut info as *mut *const c_char).cast()) != 0
                || info.is_null()
            {
                return "unknown".into();
            }
            CStr::from_ptr(info).to_string_lossy().into_owned()
        }
    }

    /// Runs the primitive on `args`: (argument, descriptor, data pointer).
    fn execute(&self, api: &Api, args: &[(c_int, &MemoryDesc, *mut c_void)]) -> Result<()> {
        if self.scratchpad_bytes > 0 {
            return SCRATCH.with(|scratch| {
                let mut scratch =
                    scratch.try_borrow_mut().map_err(|_| Error::Msg("oneDNN scratchpad in use".into()))?;
                if scratch.len() < self.scratchpad_bytes {
                    // 64-byte aligned: u64 storage rounded up, plus slack for the alignment.
                    *scratch = vec![0u64; self.scratchpad_bytes.div_ceil(8) + 8];
                }
                let base = scratch.as_mut_ptr().cast::<u8>();
                let aligned = base.wrapping_add(base.align_offset(64)).cast::<c_void>();
                let mut with_scratch = args.to_vec();
                with_scratch.push((ARG_SCRATCHPAD, &self.scratchpad, aligned));
                self.execute_args(api, &with_scratch)
            });
        }
        self.execute_args(api, args)
    }

    fn execute_args(&self, api: &Api, args: &[(c_int, &MemoryDesc, *mut c_void)]) -> Result<()> {
        let memories = args
            .iter()
            .map(|&(arg, md, data)| Ok(ExecArg { arg, memory: Memory::wrap(api, md, data)?.into_raw() }))
            .collect::<Result<Vec<_>>>();
        memories.and_then(|memories| {
            let status = STREAM.with(|stream| {
                let stream = stream.get_or_init(api)?;
                // SAFETY: every memory wraps a live buffer of its descriptor's size for the
                // duration of the call (the caller's slices); oneDNN's CPU execution is
                // synchronous for OpenMP builds.
                #[allow(unsafe_code)]
                Ok::<_, Error>(unsafe {
                    (api.primitive_execute)(self.primitive, stream, memories.len() as c_int, memories.as_ptr())
                })
            })?;
            for m in &memories {
                drop(Memory { handle: m.memory });
            }
            check(status, "execute")
        })
    }
}

impl Drop for Primitive {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: both handles are ours and dropped once.
            #[allow(unsafe_code)]
            unsafe {
                (api.primitive_destroy)(self.primitive);
                (api.pd_destroy)(self.pd);
            }
        }
    }
}

/// A oneDNN memory object.
struct Memory {
    handle: Handle,
}

// SAFETY: a memory object is only read by primitives after it is filled at load time.
#[allow(unsafe_code)]
unsafe impl Send for Memory {}
#[allow(unsafe_code)]
unsafe impl Sync for Memory {}

impl Memory {
    /// A memory object over `data` (not owned), or allocated by oneDNN when `data` is null.
    fn wrap(api: &Api, md: &MemoryDesc, data: *mut c_void) -> Result<Self> {
        let data = if data.is_null() { usize::MAX as *mut c_void } else { data }; // DNNL_MEMORY_ALLOCATE
        let mut handle = std::ptr::null_mut();
        // SAFETY: `md` is initialised; `data` is the caller's buffer of `md`'s size or the
        // allocate marker.
        #[allow(unsafe_code)]
        let status = unsafe { (api.memory_create)(&mut handle, md, api.engine, data) };
        check(status, "memory")?;
        Ok(Self { handle })
    }

    fn into_raw(self) -> Handle {
        let handle = self.handle;
        std::mem::forget(self);
        handle
    }

    fn data(&self, api: &Api) -> Result<*mut c_void> {
        let mut data = std::ptr::null_mut();
        // SAFETY: a live memory object.
        #[allow(unsafe_code)]
        check(unsafe { (api.memory_get_data_handle)(self.handle, &mut data) }, "memory data")?;
        Ok(data)
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: ours, dropped once; a wrapped buffer is not freed by oneDNN.
            #[allow(unsafe_code)]
            unsafe {
                (api.memory_destroy)(self.handle);
            }
        }
    }
}

/// One stream per thread (oneDNN streams are not shared between threads).
struct ThreadStream(OnceLock<Handle>);

impl ThreadStream {
    fn get_or_init(&self, api: &Api) -> Result<Handle> {
        if let Some(&s) = self.0.get() {
            return Ok(s);
        }
        let mut stream = std::ptr::null_mut();
        // SAFETY: the engine is live for the process.
        #[allow(unsafe_code)]
        check(unsafe { (api.stream_create)(&mut stream, api.engine, STREAM_DEFAULT_FLAGS) }, "stream")?;
        Ok(*self.0.get_or_init(|| stream))
    }
}

thread_local! {
    static STREAM: ThreadStream = const { ThreadStream(OnceLock::new()) };
    /// This thread's scratchpad for primitive executions, grown to the largest asked for.
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Layout conversions between the f32 tensors of the model and the bf16 inputs of the kernels,
/// one primitive per (dims, layouts), shared by every layer.
type ReorderKey = (Vec<i64>, c_int, c_int, c_int, c_int);
/// A reorder primitive with its source and destination descriptors.
type Reorder = Arc<(Primitive, MemoryDesc, MemoryDesc)>;
static REORDERS: OnceLock<Mutex<HashMap<ReorderKey, Reorder>>> = OnceLock::new();

/// Converts `src` (f32, `dims` in layout `src_tag`) into `dst` (`dst_type`, layout `dst_tag`),
/// which must hold as many values.
fn convert<T>(
    api: &Api,
    dims: &[i64],
    (src, src_tag): (&[f32], c_int),
    (dst, dst_type, dst_tag): (*mut T, c_int, c_int),
) -> Result<()> {
    let key = (dims.to_vec(), F32, src_tag, dst_type, dst_tag);
    let cache = REORDERS.get_or_init(Default::default);
    let cached = cache.lock().map_err(|_| Error::Msg("oneDNN reorder cache poisoned".into()))?.get(&key).cloned();
    let reorder = match cached {
        Some(r) => r,
        None => {
            let src_md = md(api, dims, F32, src_tag)?;
            let dst_md = md(api, dims, dst_type, dst_tag)?;
            let r = Arc::new((Primitive::reorder(api, &src_md, &dst_md)?, src_md, dst_md));
            cache.lock().map_err(|_| Error::Msg("oneDNN reorder cache poisoned".into()))?.insert(key, r.clone());
            r
        }
    };
    let elements: i64 = dims.iter().product();
    if src.len() != elements as usize {
        return Err(Error::Msg(format!("oneDNN reorder: {} values for {dims:?}", src.len())));
    }
    let (primitive, src_md, dst_md) = &*reorder;
    primitive.execute(api, &[(ARG_SRC, src_md, src.as_ptr() as *mut c_void), (ARG_DST, dst_md, dst.cast())])
}

/// A vector of `len` values written by `fill` through the pointer it gets — oneDNN primitives
/// that write every value of their destination — without zero-filling it first (a whole extra
/// pass over memory, on the calling thread).
fn written_by<T>(len: usize, fill: impl FnOnce(*mut T) -> Result<()>) -> Result<Vec<T>> {
    let mut values = Vec::with_capacity(len);
    fill(values.as_mut_ptr())?;
    // SAFETY: `fill` returned Ok, so the primitives it ran wrote all `len` values.
    #[allow(unsafe_code)]
    unsafe {
        values.set_len(len);
    }
    Ok(values)
}

/// bf16 weights in the layouts the kernels asked for: the first made at load, the others on
/// first use by a shape whose kernel wants another layout.
struct PackedWeights {
    packs: Mutex<Vec<Arc<(Memory, MemoryDesc)>>>,
}

impl PackedWeights {
    /// Converts `weights` (f32, `dims` in layout `tag`) into `md`.
    fn pack(api: &Api, weights: &[f32], dims: &[i64], tag: c_int, target: MemoryDesc) -> Result<Self> {
        let src_md = md(api, dims, F32, tag)?;
        let memory = Memory::wrap(api, &target, std::ptr::null_mut())?;
        let reorder = Primitive::reorder(api, &src_md, &target)?;
        reorder.execute(
            api,
            &[(ARG_SRC, &src_md, weights.as_ptr() as *mut c_void), (ARG_DST, &target, memory.data(api)?)],
        )?;
        Ok(Self { packs: Mutex::new(vec![Arc::new((memory, target))]) })
    }

    /// The weights in layout `want`, made from the first copy when new.
    fn in_layout(&self, api: &Api, want: &MemoryDesc) -> Result<Arc<(Memory, MemoryDesc)>> {
        let mut packs = self.packs.lock().map_err(|_| Error::Msg("oneDNN weights poisoned".into()))?;
        // SAFETY: both descriptors are initialised.
        #[allow(unsafe_code)]
        if let Some(p) = packs.iter().find(|p| unsafe { (api.md_equal)(&p.1, want) } != 0) {
            return Ok(p.clone());
        }
        let first = packs.first().cloned().ok_or_else(|| Error::Msg("oneDNN weights: empty".into()))?;
        let memory = Memory::wrap(api, want, std::ptr::null_mut())?;
        let reorder = Primitive::reorder(api, &first.1, want)?;
        reorder.execute(api, &[(ARG_SRC, &first.1, first.0.data(api)?), (ARG_DST, want, memory.data(api)?)])?;
        let pack = Arc::new((memory, *want));
        packs.push(pack.clone());
        tracing::debug!(layouts = packs.len(), "oneDNN weights repacked for a new shape");
        Ok(pack)
    }
}

/// A primitive for one input shape and the weights in its layout.
struct ShapedPrimitive {
    primitive: Primitive,
    weights: Arc<(Memory, MemoryDesc)>,
    io: Operands,
}

/// The descriptors of a product's input, bias and output for one shape.
#[derive(Clone, Copy)]
struct Operands {
    src: MemoryDesc,
    bias: MemoryDesc,
    dst: MemoryDesc,
}

/// Primitives by input shape, built on first use.
struct PrimitiveCache<K> {
    by_shape: Mutex<Vec<(K, Arc<ShapedPrimitive>)>>,
}

impl<K: PartialEq + Copy> PrimitiveCache<K> {
    fn new() -> Self {
        Self { by_shape: Mutex::new(Vec::new()) }
    }

    fn get_or_build(&self, key: K, build: impl FnOnce() -> Result<ShapedPrimitive>) -> Result<Arc<ShapedPrimitive>> {
        let lock = || self.by_shape.lock().map_err(|_| Error::Msg("oneDNN primitive cache poisoned".into()));
        if let Some((_, p)) = lock()?.iter().find(|(k, _)| *k == key) {
            return Ok(p.clone());
        }
        let built = Arc::new(build()?);
        lock()?.push((key, built.clone()));
        Ok(built)
    }
}

/// `y = x Wᵀ + b` with float32 accumulation and output.
pub struct OneDnnLinear {
    /// What the product multiplies in.
    precision: Precision,
    /// Input features.
    in_features: usize,
    /// Output features.
    out_features: usize,
    /// `W` (`[out, in]`) in the product's precision.
    weights: PackedWeights,
    /// `b` in float32 (zeros when the layer has none: the kernel adds it for free).
    bias: Vec<f32>,
    /// Primitives by rows per sequence.
    primitives: PrimitiveCache<usize>,
}

impl std::fmt::Debug for OneDnnLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OneDnnLinear({} -> {})", self.in_features, self.out_features)
    }
}

/// The rows per sequence the load-time weight layout is chosen for (a 512-pixel image's
/// attention at the UNet's second level); other shapes reuse it when their kernel agrees.
const REFERENCE_ROWS: i64 = 1024;

impl OneDnnLinear {
    /// Packs `weight` (`[out, in]` row-major, f32) and `bias` (`[out]`).
    pub fn new(
        precision: Precision,
        weight: &[f32],
        out_features: usize,
        in_features: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let api = api()?;
        if weight.len() != out_features * in_features {
            return Err(Error::Msg(format!(
                "oneDNN linear: {} weights for {out_features}×{in_features}",
                weight.len()
            )));
        }
        let bias = bias.map_or_else(|| vec![0.0; out_features], <[f32]>::to_vec);
        let (reference, _) = Self::build(api, precision, REFERENCE_ROWS, (in_features, out_features))?;
        let weights = PackedWeights::pack(
            api,
            weight,
            &[in_features as i64, out_features as i64],
            TAG_BA,
            reference.weights_md(api)?,
        )?;
        Ok(Self { precision, in_features, out_features, weights, bias, primitives: PrimitiveCache::new() })
    }

    /// A matmul primitive for `rows` rows, its weights in the layout its kernel chooses
    /// ([`Primitive::weights_md`]).
    fn build(api: &Api, precision: Precision, rows: i64, (k, n): (usize, usize)) -> Result<(Primitive, Operands)> {
        let (k, n) = (k as i64, n as i64);
        let io = Operands {
            src: md(api, &[rows, k], precision.data_type(), TAG_AB)?,
            bias: md(api, &[1, n], F32, TAG_AB)?,
            dst: md(api, &[rows, n], F32, TAG_AB)?,
        };
        let any = md(api, &[k, n], precision.data_type(), TAG_ANY)?;
        let mut op = OpDesc([0; 8192]);
        // SAFETY: all descriptors initialised; `op` has room for a matmul descriptor.
        #[allow(unsafe_code)]
        let status = unsafe { (api.matmul_desc_init)(&mut op, &io.src, &any, &io.bias, &io.dst) };
        check(status, "matmul descriptor")?;
        Ok((Primitive::create(api, &op)?, io))
    }

    fn primitive(&self, api: &Api, rows: usize) -> Result<Arc<ShapedPrimitive>> {
        self.primitives.get_or_build(rows, || {
            let (k, n) = (self.in_features, self.out_features);
            let (primitive, io) = Self::build(api, self.precision, rows as i64, (k, n))?;
            let weights = self.weights.in_layout(api, &primitive.weights_md(api)?)?;
            tracing::debug!(rows, k, n, implementation = %primitive.implementation(api), "oneDNN matmul");
            Ok(ShapedPrimitive { primitive, weights, io })
        })
    }

    /// `x`: `sequences` sequences of equal length, `[sequences · rows, in]` row-major.
    /// Returns `[sequences · rows, out]`.
    pub fn forward(&self, x: &[f32], sequences: usize) -> Result<Vec<f32>> {
        let api = api()?;
        let (k, n) = (self.in_features, self.out_features);
        let total_rows = x.len() / k.max(1);
        if sequences == 0 || x.len() != total_rows * k || !total_rows.is_multiple_of(sequences) {
            return Err(Error::Msg(format!("oneDNN linear: {} values are not {sequences} sequences of {k}", x.len())));
        }
        let rows = total_rows / sequences;
        let p = self.primitive(api, rows)?;
        match self.precision {
            Precision::F32 => written_by(total_rows * n, |dst| self.run(api, &p, x, rows, dst)),
            Precision::Bf16 => {
                let dims = [total_rows as i64, k as i64];
                let src = written_by::<u16>(x.len(), |src| convert(api, &dims, (x, TAG_AB), (src, BF16, TAG_AB)))?;
                written_by(total_rows * n, |dst| self.run(api, &p, &src, rows, dst))
            }
        }
    }

    /// One call per sequence of `rows` rows of `src` (already in the product's precision), into
    /// `dst` (room for as many rows of `out_features` values).
    fn run<T>(&self, api: &Api, p: &ShapedPrimitive, src: &[T], rows: usize, dst: *mut f32) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        for (i, input) in src.chunks_exact(rows * k).enumerate() {
            p.primitive.execute(
                api,
                &[
                    (ARG_SRC, &p.io.src, input.as_ptr() as *mut c_void),
                    (ARG_WEIGHTS, &p.weights.1, p.weights.0.data(api)?),
                    (ARG_BIAS, &p.io.bias, self.bias.as_ptr() as *mut c_void),
                    (ARG_DST, &p.io.dst, dst.wrapping_add(i * rows * n).cast()),
                ],
            )?;
        }
        Ok(())
    }
}

/// A 2-D convolution with float32 accumulation, bias and output.
pub struct OneDnnConv2d {
    /// What the product multiplies in.
    precision: Precision,
    /// Input channels.
    c_in: usize,
    /// Output channels.
    c_out: usize,
    /// Square kernel size.
    kernel: usize,
    /// Zero padding on every side.
    padding: usize,
    /// Stride in both directions.
    stride: usize,
    /// `[c_out, c_in, k, k]` in the product's precision.
    weights: PackedWeights,
    /// `[c_out]`, float32.
    bias: Vec<f32>,
    /// Primitives by input height and width.
    primitives: PrimitiveCache<(usize, usize)>,
}

impl std::fmt::Debug for OneDnnConv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OneDnnConv2d({} -> {}, {}×{})", self.c_in, self.c_out, self.kernel, self.kernel)
    }
}

/// The input size the load-time weight layout is chosen for (a 512-pixel image's latents).
const REFERENCE_SIZE: usize = 64;

impl OneDnnConv2d {
    /// Packs `weight` (`[c_out, c_in, k, k]`, f32) and `bias` (`[c_out]`).
    pub fn new(
        precision: Precision,
        weight: &[f32],
        bias: &[f32],
        (c_in, c_out, kernel): (usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let api = api()?;
        if weight.len() != c_out * c_in * kernel * kernel || bias.len() != c_out {
            return Err(Error::Msg(format!("oneDNN conv: weights do not fit {c_out}×{c_in}×{kernel}×{kernel}")));
        }
        let mut conv = Self {
            precision,
            c_in,
            c_out,
            kernel,
            padding,
            stride,
            weights: PackedWeights { packs: Mutex::new(Vec::new()) },
            bias: bias.to_vec(),
            primitives: PrimitiveCache::new(),
        };
        let size = REFERENCE_SIZE.max(kernel);
        let (reference, _) = conv.build(api, (size, size))?;
        let dims = [c_out as i64, c_in as i64, kernel as i64, kernel as i64];
        conv.weights = PackedWeights::pack(api, weight, &dims, TAG_NCHW, reference.weights_md(api)?)?;
        Ok(conv)
    }

    fn output_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (k, p, s) = (self.kernel, self.padding, self.stride);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// A convolution primitive for one `h × w` image, its weights in the layout its kernel
    /// chooses ([`Primitive::weights_md`]).
    fn build(&self, api: &Api, (h, w): (usize, usize)) -> Result<(Primitive, Operands)> {
        let (oh, ow) = self.output_size((h, w));
        let (c, o, k) = (self.c_in as i64, self.c_out as i64, self.kernel as i64);
        let io = Operands {
            src: md(api, &[1, c, h as i64, w as i64], self.precision.data_type(), TAG_NHWC)?,
            bias: md(api, &[o], F32, TAG_A)?,
            dst: md(api, &[1, o, oh as i64, ow as i64], F32, TAG_NHWC)?,
        };
        let any = md(api, &[o, c, k, k], self.precision.data_type(), TAG_ANY)?;
        let strides = [self.stride as i64; 2];
        let padding = [self.padding as i64; 2];
        let mut op = OpDesc([0; 8192]);
        // SAFETY: all descriptors initialised; `op` has room for a convolution descriptor.
        #[allow(unsafe_code)]
        let status = unsafe {
            (api.conv_desc_init)(
                &mut op,
                FORWARD_INFERENCE,
                CONVOLUTION_DIRECT,
                &io.src,
                &any,
                &io.bias,
                &io.dst,
                strides.as_ptr(),
                padding.as_ptr(),
                padding.as_ptr(),
            )
        };
        check(status, "convolution descriptor")?;
        Ok((Primitive::create(api, &op)?, io))
    }

    fn primitive(&self, api: &Api, (h, w): (usize, usize)) -> Result<Arc<ShapedPrimitive>> {
        self.primitives.get_or_build((h, w), || {
            let (primitive, io) = self.build(api, (h, w))?;
            let weights = self.weights.in_layout(api, &primitive.weights_md(api)?)?;
            tracing::debug!(c_in = self.c_in, c_out = self.c_out, k = self.kernel, h, w,
                implementation = %primitive.implementation(api), "oneDNN convolution");
            Ok(ShapedPrimitive { primitive, weights, io })
        })
    }

    /// `x`: `[b, c_in, h, w]` (NCHW, f32) → `([b, c_out, oh, ow]` NCHW f32, `oh`, `ow`).
    pub fn forward(&self, x: &[f32], (b, h, w): (usize, usize, usize)) -> Result<(Vec<f32>, usize, usize)> {
        let api = api()?;
        let (c, o) = (self.c_in, self.c_out);
        if x.len() != b * c * h * w || h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            return Err(Error::Msg(format!("oneDNN conv: input of {} values is not [{b}, {c}, {h}, {w}]", x.len())));
        }
        let (oh, ow) = self.output_size((h, w));
        let dims = [b as i64, c as i64, h as i64, w as i64];
        let p = self.primitive(api, (h, w))?;
        let len = b * o * oh * ow;
        let shape = (h, w, oh, ow);
        // NCHW f32 → NHWC in the product's precision (bytes), one call per image, NHWC f32 out.
        let dt = self.precision.data_type();
        let src = written_by::<u8>(x.len() * self.precision.bytes(), |src| {
            convert(api, &dims, (x, TAG_NCHW), (src, dt, TAG_NHWC))
        })?;
        let dst_nhwc = written_by(len, |dst| self.run(api, &p, &src, shape, dst))?;
        let out_dims = [b as i64, o as i64, oh as i64, ow as i64];
        let out = written_by(len, |out| convert(api, &out_dims, (&dst_nhwc, TAG_NHWC), (out, F32, TAG_NCHW)))?;
        Ok((out, oh, ow))
    }

    /// One call per image of `src` (NHWC, the product's precision, as bytes) into `dst`
    /// (NHWC f32).
    fn run(
        &self,
        api: &Api,
        p: &ShapedPrimitive,
        src: &[u8],
        (h, w, oh, ow): (usize, usize, usize, usize),
        dst: *mut f32,
    ) -> Result<()> {
        let (c, o) = (self.c_in, self.c_out);
        for (i, image) in src.chunks_exact(c * h * w * self.precision.bytes()).enumerate() {
            let out = dst.wrapping_add(i * o * oh * ow);
            p.primitive.execute(
                api,
                &[
                    (ARG_SRC, &p.io.src, image.as_ptr() as *mut c_void),
                    (ARG_WEIGHTS, &p.weights.1, p.weights.0.data(api)?),
                    (ARG_BIAS, &p.io.bias, self.bias.as_ptr() as *mut c_void),
                    (ARG_DST, &p.io.dst, out.cast()),
                ],
            )?;
        }
        Ok(())
    }
}

/// The primitives of one attention slice shape: `heads` heads of `rows` queries against `m`
/// keys of width `d`, every operand a dense per-head matrix.
struct AttentionPrimitives {
    /// `scores = scale · q kᵀ`, one head: `[rows, d] × [d, m] → [rows, m]` (f32).
    scores: Primitive,
    q: MemoryDesc,
    k_t: MemoryDesc,
    scores_md: MemoryDesc,
    /// Softmax over the last axis of every head's scores at once, into the product precision.
    softmax: Primitive,
    all_scores: MemoryDesc,
    all_probs: MemoryDesc,
    /// `out = p v`, one head: `[rows, m] × [m, d] → [rows, d]` (f32).
    output: Primitive,
    probs: MemoryDesc,
    v: MemoryDesc,
    out: MemoryDesc,
}

/// Attention primitives by (precision, heads, rows, m, d).
type AttentionKey = (Precision, usize, usize, usize, usize);
static ATTENTION: OnceLock<Mutex<HashMap<AttentionKey, Arc<AttentionPrimitives>>>> = OnceLock::new();

fn attention_primitives(api: &Api, key: AttentionKey, scale: f32) -> Result<Arc<AttentionPrimitives>> {
    let cache = ATTENTION.get_or_init(Default::default);
    let poisoned = |_| Error::Msg("oneDNN attention cache poisoned".into());
    if let Some(p) = cache.lock().map_err(poisoned)?.get(&key) {
        return Ok(p.clone());
    }
    let (precision, heads, rows, m, d) = key;
    let dt = precision.data_type();
    let (rows, m, d, heads) = (rows as i64, m as i64, d as i64, heads as i64);
    let q = md(api, &[rows, d], dt, TAG_AB)?;
    let k_t = md(api, &[d, m], dt, TAG_BA)?;
    let scores_md = md(api, &[rows, m], F32, TAG_AB)?;
    let mut op = OpDesc([0; 8192]);
    // SAFETY: initialised descriptors; room for a matmul descriptor.
    #[allow(unsafe_code)]
    check(unsafe { (api.matmul_desc_init)(&mut op, &q, &k_t, std::ptr::null(), &scores_md) }, "scores descriptor")?;
    let scores = Primitive::create_scaled(api, &op, Some(scale))?;
    let all_scores = md(api, &[heads * rows, m], F32, TAG_AB)?;
    let all_probs = md(api, &[heads * rows, m], dt, TAG_AB)?;
    let mut op = OpDesc([0; 8192]);
    // SAFETY: as above; room for a softmax descriptor.
    #[allow(unsafe_code)]
    check(
        unsafe { (api.softmax_desc_init)(&mut op, FORWARD_INFERENCE, SOFTMAX_ACCURATE, &all_scores, &all_probs, 1) },
        "softmax descriptor",
    )?;
    let softmax = Primitive::create(api, &op)?;
    let probs = md(api, &[rows, m], dt, TAG_AB)?;
    let v = md(api, &[m, d], dt, TAG_AB)?;
    let out = md(api, &[rows, d], F32, TAG_AB)?;
    let mut op = OpDesc([0; 8192]);
    // SAFETY: as above.
    #[allow(unsafe_code)]
    check(unsafe { (api.matmul_desc_init)(&mut op, &probs, &v, std::ptr::null(), &out) }, "output descriptor")?;
    let output = Primitive::create(api, &op)?;
    tracing::debug!(?precision, heads, rows, m, d, scores = %scores.implementation(api),
        softmax = %softmax.implementation(api), output = %output.implementation(api), "oneDNN attention");
    let built = Arc::new(AttentionPrimitives {
        scores,
        q,
        k_t,
        scores_md,
        softmax,
        all_scores,
        all_probs,
        output,
        probs,
        v,
        out,
    });
    cache.lock().map_err(poisoned)?.insert(key, built.clone());
    Ok(built)
}

/// The shape of one attention call: `images` images of `queries` tokens attending to `keys`
/// tokens, `heads` heads of `head_dim` values (rows of `heads · head_dim`).
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Images in the batch.
    pub images: usize,
    /// Query tokens per image.
    pub queries: usize,
    /// Key/value tokens per image.
    pub keys: usize,
    /// Heads.
    pub heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Copies `x` (`[images, tokens, heads, d]`, f32) head-major (`[images, heads, tokens, d]`) in
/// `precision`: each head's matrix dense, as oneDNN's fastest kernels want it.
fn heads_first(
    api: &Api,
    x: &[f32],
    (images, tokens, heads, d): (usize, usize, usize, usize),
    precision: Precision,
) -> Result<Vec<u8>> {
    let dims = [images as i64, tokens as i64, heads as i64, d as i64];
    written_by(x.len() * precision.bytes(), |dst: *mut u8| {
        convert(api, &dims, (x, TAG_NCHW), (dst, precision.data_type(), TAG_ACBD))
    })
}

/// `softmax(q kᵀ / √d) v` per image and head on oneDNN: `q` `[images, queries, heads·d]`, `k` and
/// `v` `[images, keys, heads·d]` (f32, row-major) → `[images, queries, heads·d]` (f32).
///
/// The operands are copied head-major in the product precision (one pass each); scores are
/// float32 (the product accumulates and writes f32), the softmax reads them in f32 and writes
/// the product precision. Scores are computed in the caller's `(heads per slice, query rows per
/// chunk)` slices (the f32 path's policy, `nets::attention::score_slices`); every call sees one
/// image, so batches are bit-identical to single images.
pub fn attention(
    precision: Precision,
    (q, k, v): (&[f32], &[f32], &[f32]),
    shape: AttentionShape,
    (heads_per_slice, rows_per_chunk): (usize, usize),
) -> Result<Vec<f32>> {
    let api = api()?;
    let AttentionShape { images, queries: n, keys: m, heads, head_dim: d } = shape;
    let inner = heads * d;
    if q.len() != images * n * inner || k.len() != images * m * inner || v.len() != k.len() || heads == 0 {
        return Err(Error::Msg(format!("oneDNN attention: q/k/v sizes do not fit {shape:?}")));
    }
    if heads_per_slice == 0 || rows_per_chunk == 0 {
        return Err(Error::Msg("oneDNN attention: empty slices".into()));
    }
    let scale = (d as f64).powf(-0.5) as f32;
    let qh = heads_first(api, q, (images, n, heads, d), precision)?;
    let kh = heads_first(api, k, (images, m, heads, d), precision)?;
    let vh = heads_first(api, v, (images, m, heads, d), precision)?;
    let elem = precision.bytes();
    let at = |x: &[u8], index: usize| x.as_ptr().wrapping_add(index * elem) as *mut c_void;
    let mut scores = vec![0f32; heads_per_slice * rows_per_chunk * m];
    let mut probs = vec![0u8; heads_per_slice * rows_per_chunk * m * elem];
    // Head-major output, [images, heads, n, d].
    let out_heads = written_by(images * n * inner, |out: *mut f32| {
        for image in 0..images {
            for h0 in (0..heads).step_by(heads_per_slice) {
                let hl = heads_per_slice.min(heads - h0);
                for r0 in (0..n).step_by(rows_per_chunk) {
                    let rows = rows_per_chunk.min(n - r0);
                    let p = attention_primitives(api, (precision, hl, rows, m, d), scale)?;
                    for h in 0..hl {
                        let head = image * heads + h0 + h;
                        p.scores.execute(
                            api,
                            &[
                                (ARG_SRC, &p.q, at(&qh, (head * n + r0) * d)),
                                (ARG_WEIGHTS, &p.k_t, at(&kh, head * m * d)),
                                (ARG_DST, &p.scores_md, scores.as_mut_ptr().wrapping_add(h * rows * m).cast()),
                            ],
                        )?;
                    }
                    p.softmax.execute(
                        api,
                        &[
                            (ARG_SRC, &p.all_scores, scores.as_mut_ptr().cast()),
                            (ARG_DST, &p.all_probs, probs.as_mut_ptr().cast()),
                        ],
                    )?;
                    for h in 0..hl {
                        let head = image * heads + h0 + h;
                        p.output.execute(
                            api,
                            &[
                                (ARG_SRC, &p.probs, at(&probs, h * rows * m)),
                                (ARG_WEIGHTS, &p.v, at(&vh, head * m * d)),
                                (ARG_DST, &p.out, out.wrapping_add((head * n + r0) * d).cast()),
                            ],
                        )?;
                    }
                }
            }
        }
        Ok(())
    })?;
    // Back to token-major: the source is [images, n, heads, d] laid out as acbd.
    let dims = [images as i64, n as i64, heads as i64, d as i64];
    written_by(out_heads.len(), |out: *mut f32| convert(api, &dims, (&out_heads, TAG_ACBD), (out, F32, TAG_NCHW)))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Vec<f32> {
        // A small deterministic generator: the tests compare against f32 references, not values.
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..shape.iter().product::<usize>())
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Largest |a − b| relative to the largest |b|.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// bf16 inputs and weights (8 significant bits) with f32 sums: a few 1e-3 of the largest
    /// output on these sizes; an f32 error or a wrong layout is orders of magnitude off.
    const BF16_BOUND: f32 = 1.5e-2;

    /// The precisions this machine runs, with their bounds relative to the largest output. On
    /// a CPU or machine without oneDNN's bf16 (or without oneDNN), the error is the documented
    /// one.
    fn precisions() -> Vec<(Precision, f32)> {
        let mut runs = Vec::new();
        match ensure_library() {
            Ok(_) => runs.push((Precision::F32, 1e-5)),
            Err(e) => assert!(e.to_string().contains("apt-get install libdnnl2"), "{e}"),
        }
        match ensure_available() {
            Ok(_) => runs.push((Precision::Bf16, BF16_BOUND)),
            Err(e) => assert!(e.to_string().contains("--dtype f32"), "{e}"),
        }
        runs
    }

    #[test]
    fn linear_layers_match_f32_within_their_bound_and_sequences_do_not_depend_on_their_batch() {
        for (precision, bound) in precisions() {
            for (rows, k, n, bias) in
                [(77, 768, 320, false), (1024, 320, 2560, true), (16, 1280, 1280, true), (1, 64, 8, true)]
            {
                let w = randn(&[n, k], 1);
                let b = randn(&[n], 2);
                let layer = OneDnnLinear::new(precision, &w, n, k, bias.then_some(&b[..])).expect("pack");
                let x = randn(&[3, rows, k], 3);
                let ours = layer.forward(&x, 3).expect("forward");
                let reference = (Tensor::from_slice(&x, (3 * rows, k), &Device::Cpu).expect("x"))
                    .matmul(&Tensor::from_slice(&w, (n, k), &Device::Cpu).expect("w").t().expect("t"))
                    .and_then(|y| if bias { y.broadcast_add(&Tensor::from_slice(&b, n, &Device::Cpu)?) } else { Ok(y) })
                    .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
                    .expect("reference");
                let err = rel_err(&ours, &reference);
                assert!(err < bound, "{precision:?} {rows}×{k}→{n}: {err}");
                let alone = layer.forward(&x[..rows * k], 1).expect("alone");
                assert_eq!(alone, ours[..rows * n], "{rows}×{k}→{n}: batch invariance");
                let second = layer.forward(&x[rows * k..2 * rows * k], 1).expect("second");
                assert_eq!(second, ours[rows * n..2 * rows * n], "{rows}×{k}→{n}: batch invariance");
            }
        }
    }

    #[test]
    fn convolutions_match_f32_within_their_bound_for_every_shape_the_networks_use() {
        let dev = Device::Cpu;
        for (precision, bound) in precisions() {
            // Full-size layers too: SD's first level at 256 px, and a VAE decoder level whose
            // kernel wants another weight layout than the load-time one.
            let full_size = [(320, 320, 3, 1, 1, 32, 32), (128, 128, 3, 1, 1, 96, 96)];
            for &(c_in, c_out, k, p, s, h, w) in crate::nets::conv::NETWORK_SHAPES.iter().chain(&full_size) {
                let weight = randn(&[c_out, c_in, k, k], 4);
                let bias = randn(&[c_out], 5);
                let conv = OneDnnConv2d::new(precision, &weight, &bias, (c_in, c_out, k), p, s).expect("pack");
                let x = randn(&[2, c_in, h, w], 6);
                let (ours, oh, ow) = conv.forward(&x, (2, h, w)).expect("forward");
                let reference = Tensor::from_slice(&x, (2, c_in, h, w), &dev)
                    .and_then(|x| x.conv2d(&Tensor::from_slice(&weight, (c_out, c_in, k, k), &dev)?, p, s, 1, 1))
                    .and_then(|y| y.broadcast_add(&Tensor::from_slice(&bias, (1, c_out, 1, 1), &dev)?))
                    .expect("reference");
                assert_eq!(reference.dims(), [2, c_out, oh, ow]);
                let reference = reference.flatten_all().and_then(|r| r.to_vec1::<f32>()).expect("values");
                let err = rel_err(&ours, &reference);
                assert!(err < bound, "{precision:?} {c_in}->{c_out} k{k} p{p} s{s} {h}×{w}: {err}");
                let (alone, _, _) = conv.forward(&x[..c_in * h * w], (1, h, w)).expect("alone");
                assert_eq!(alone, ours[..c_out * oh * ow], "{c_in}->{c_out} {h}×{w}: batch invariance");
            }
        }
    }

    #[test]
    fn attention_matches_f32_within_its_bound_and_images_do_not_depend_on_their_batch() {
        let dev = Device::Cpu;
        // SD's first level at 256 px (self and cross), a VAE-like single head, and a slice budget
        // small enough to split heads and queries.
        for (n, m, heads, d, budget) in [
            (1024, 1024, 8, 40, 16 << 20),
            (1024, 77, 8, 40, 16 << 20),
            (256, 256, 1, 512, 16 << 20),
            (300, 300, 4, 16, 100_000),
        ] {
            for (precision, bound) in precisions() {
                let inner = heads * d;
                let (q, k, v) = (randn(&[2, n, inner], 7), randn(&[2, m, inner], 8), randn(&[2, m, inner], 9));
                let shape = AttentionShape { images: 2, queries: n, keys: m, heads, head_dim: d };
                let slices = crate::nets::attention::score_slices((n, m), heads, 4, budget);
                let ours = attention(precision, (&q, &k, &v), shape, slices).expect("attention");
                let split = |x: &[f32], len: usize| {
                    Tensor::from_slice(x, (2, len, heads, d), &dev)
                        .and_then(|t| t.transpose(1, 2)?.contiguous())
                        .expect("split")
                };
                let (tq, tk, tv) = (split(&q, n), split(&k, m), split(&v, m));
                let reference = tq
                    .matmul(&tk.t().expect("t"))
                    .and_then(|s| s * (d as f64).powf(-0.5))
                    .and_then(|s| candle_nn::ops::softmax_last_dim(&s))
                    .and_then(|p| p.matmul(&tv))
                    .and_then(|o| o.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>())
                    .expect("reference");
                let err = rel_err(&ours, &reference);
                assert!(err < bound * 2.0, "{precision:?} n{n} m{m} h{heads} d{d}: {err}");
                let one = AttentionShape { images: 1, ..shape };
                let second = attention(precision, (&q[n * inner..], &k[m * inner..], &v[m * inner..]), one, slices)
                    .expect("alone");
                assert_eq!(second, ours[n * inner..], "{precision:?} n{n}: batch invariance");
            }
        }
    }

    #[test]
    fn a_missing_library_is_a_clear_error_naming_the_package_and_the_alternative() {
        let Err(err) = open("libdnnl-does-not-exist.so.2") else { panic!("opened a missing library") };
        assert!(err.contains("apt-get install libdnnl2") && err.contains("--dtype f32"), "{err}");
    }

    #[test]
    fn isa_names_say_whether_bf16_is_there() {
        assert_eq!(isa_name(ISA_AVX512_CORE_AMX), "AVX-512 with AMX");
        assert!(isa_name(0x27).contains("no bf16"));
        assert!(isa_name(0x7).contains("no bf16"));
    }
}
