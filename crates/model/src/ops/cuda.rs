//! CUDA plumbing shared by the ops' `cuda_fwd`: our kernels' PTX modules (crate
//! `sft-kernels`) loaded into candle's device, typed views of storages, launch sizes, and the
//! device settings a training process wants (a memory pool that keeps freed blocks, no
//! per-tensor event tracking on a single stream).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};

/// A kernel's input: a storage and its layout.
pub(crate) type In<'a> = (&'a CudaStorage, &'a Layout);
/// A kernel's output: a storage and its shape.
pub(crate) type Out = Result<(CudaStorage, candle_core::Shape)>;

/// The PTX modules of `sft-kernels`.
#[derive(Clone, Copy)]
pub(crate) enum Module {
    Attention,
    Elementwise,
    Loss,
    Norm,
}

impl Module {
    fn name_and_ptx(self) -> (&'static str, &'static str) {
        match self {
            Module::Attention => ("sft-attention", sft_kernels::ATTENTION),
            Module::Elementwise => ("sft-elementwise", sft_kernels::ELEMENTWISE),
            Module::Loss => ("sft-loss", sft_kernels::LOSS),
            Module::Norm => ("sft-norm", sft_kernels::NORM),
        }
    }
}

/// A kernel of a module (loaded on first use).
pub(crate) fn func(dev: &CudaDevice, module: Module, name: &str) -> Result<Kernel> {
    let (m, ptx) = module.name_and_ptx();
    Ok(Kernel {
        f: dev
            .get_or_load_custom_func(name, m, ptx)?
            .into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

/// A loaded kernel and the stream it is launched on (the device's one stream).
pub(crate) struct Kernel {
    f: CudaFunction,
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

/// The kernels' name suffix of a storage dtype (f32, bf16 and f16 have kernels).
pub(crate) fn suffix(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => bail!("no CUDA kernel for {dt:?}"),
    })
}

/// Whether the CUDA kernels take this dtype (f64 runs composed).
pub(crate) fn supported(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

/// The device address of a layout's first element (any dtype: the kernels take raw pointers,
/// so the only dispatch on the dtype is the kernel name's suffix).
pub(crate) fn ptr(s: &CudaStorage, l: &Layout) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::CudaStorageSlice as S;
    let stream = s.device.cuda_stream();
    let (base, size) = match &s.slice {
        S::F32(v) => (v.device_ptr(&stream).0, 4),
        S::BF16(v) => (v.device_ptr(&stream).0, 2),
        S::F16(v) => (v.device_ptr(&stream).0, 2),
        S::U32(v) => (v.device_ptr(&stream).0, 4),
        S::I64(v) => (v.device_ptr(&stream).0, 8),
        S::F64(v) => (v.device_ptr(&stream).0, 8),
        _ => bail!("no CUDA kernel for {:?}", s.dtype()),
    };
    Ok(base + (l.start_offset() * size) as u64)
}

/// The address of a whole storage's first element.
pub(crate) fn base(s: &CudaStorage) -> Result<u64> {
    ptr(s, &Layout::contiguous(1))
}

/// A new storage of `n` elements of `dt` (uninitialised: the kernel writing it writes all).
pub(crate) fn new_storage(dev: &CudaDevice, dt: DType, n: usize) -> Result<CudaStorage> {
    Ok(match dt {
        DType::F32 => wrap(alloc::<f32>(dev, n)?, dev),
        DType::BF16 => wrap(alloc::<half::bf16>(dev, n)?, dev),
        DType::F16 => wrap(alloc::<half::f16>(dev, n)?, dev),
        dt => bail!("no CUDA kernel for {dt:?}"),
    })
}

/// `n` uninitialised elements (every kernel writing into one writes all of them).
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers' kernels write every element before anything reads it.
    unsafe { dev.alloc::<T>(n) }
}

pub(crate) fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// Requires a contiguous layout (the row kernels read rows back to back).
pub(crate) fn contiguous(l: &Layout, op: &str) -> Result<()> {
    if l.is_contiguous() {
        Ok(())
    } else {
        bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            l.stride()
        )
    }
}

/// Launches `f` with `cfg` and the arguments pushed by `args`.
pub(crate) fn launch<'a>(
    k: &'a Kernel,
    cfg: LaunchConfig,
    args: impl FnOnce(&mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>),
) -> Result<()> {
    let mut b = k.stream.launch_builder(&k.f);
    args(&mut b);
    // SAFETY: each caller passes the arguments its kernel declares, pointers to live storages.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Launches the simple kernel `name_<dtype>(inputs..., out, size)` of `module` (contiguous
/// inputs; `out`: `out_len` elements of the first input's dtype) and returns `out`.
pub(crate) fn launch_simple<S: DeviceRepr>(
    module: Module,
    name: &str,
    inputs: &[In],
    out_len: usize,
    cfg: LaunchConfig,
    size: S,
) -> Result<CudaStorage> {
    let dev = inputs[0].0.device();
    let dt = inputs[0].0.dtype();
    let mut ptrs = vec![];
    for (s, l) in inputs {
        contiguous(l, name)?;
        ptrs.push(ptr(s, l)?);
    }
    let out = new_storage(dev, dt, out_len)?;
    let op = base(&out)?;
    let f = func(dev, module, &format!("{name}_{}", suffix(dt)?))?;
    launch(&f, cfg, |b| {
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&op).arg(&size);
    })?;
    Ok(out)
}

/// A grid-stride launch over `n` items, 256 threads a block.
pub(crate) fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row, `threads` (a multiple of 32) for a row of `d`.
pub(crate) fn rows(n_rows: usize, d: usize) -> LaunchConfig {
    let threads = d.div_ceil(32).clamp(1, 32) as u32 * 32;
    LaunchConfig {
        grid_dim: (n_rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Lets `f` use `bytes` of dynamic shared memory (over the default 48 KiB).
pub(crate) fn allow_smem(k: &Kernel, bytes: usize) -> Result<()> {
    k.f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()
}

/// The LoRA kernels' view of a dropout mask (`MaskArg` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskArg {
    pub seed: u64,
    pub mask: sys::CUdeviceptr,
    pub stream: u32,
    pub thr: u32,
    pub inv: f32,
    pub mode: i32,
}

// SAFETY: plain `repr(C)` data, the layout of the C struct.
unsafe impl DeviceRepr for MaskArg {}

/// The device settings of a training process, applied once per device: the default memory
/// pool keeps freed blocks for reuse (as PyTorch's caching allocator does; by default it hands
/// them back to the driver at every synchronisation), and tensors skip cudarc's per-use event
/// records (everything runs on one stream).
pub fn tune_device(dev: &CudaDevice) -> Result<()> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    // SAFETY: plain driver calls on the context's own device; the value outlives the call.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .w()?;
        let mut keep: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .w()?;
        // SAFETY: a single stream: no tensor crosses streams (see cudarc's contract).
        dev.disable_event_tracking();
    }
    Ok(())
}

/// The memory pool's high-water marks since the last [`reset_peak_memory`]: bytes in use by
/// tensors (PyTorch's `max_memory_allocated`) and bytes reserved from the driver.
pub fn peak_memory(dev: &CudaDevice) -> Result<(u64, u64)> {
    let (pool, _) = default_pool(dev)?;
    let read = |attr| -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the attribute is a u64 for these two.
        unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
                .result()
                .w()?;
        }
        Ok(v)
    };
    Ok((
        read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
    ))
}

/// Restarts the high-water marks of [`peak_memory`].
pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    let (pool, _) = default_pool(dev)?;
    for attr in [
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ] {
        let mut zero: u64 = 0;
        // SAFETY: resetting a high-water mark takes a u64 0.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut std::ffi::c_void)
                .result()
                .w()?;
        }
    }
    Ok(())
}

fn default_pool(dev: &CudaDevice) -> Result<(sys::CUmemoryPool, ())> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a driver query on the context's device.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .w()?;
    }
    Ok((pool, ()))
}

/// The storage of a tensor on a CUDA device (kernels read other tensors' storages this way).
pub(crate) fn with_storage<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(s) => f(s, l),
        _ => bail!("expected a tensor on the GPU"),
    }
}
