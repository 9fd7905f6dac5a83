//! The real GPU's side of the launches (`ops/launch.rs` builds them, the same for both
//! devices): our kernels' PTX modules (crate `sft-kernels`) loaded into candle's device, the
//! launch through the driver, and the device settings a training process wants (a memory pool
//! that keeps freed blocks, no per-tensor event tracking on a single stream).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Tensor};

use super::launch::{Arg, GpuStorage, Launch, Module};

fn ptx(module: Module) -> (&'static str, &'static str) {
    match module {
        Module::Attention => ("sft-attention", sft_kernels::ATTENTION),
        Module::Elementwise => ("sft-elementwise", sft_kernels::ELEMENTWISE),
        Module::Loss => ("sft-loss", sft_kernels::LOSS),
        Module::Norm => ("sft-norm", sft_kernels::NORM),
        Module::Quant => ("sft-quant", sft_kernels::QUANT),
    }
}

/// The device address of a layout's first element (any dtype: the kernels take raw pointers).
fn ptr(s: &CudaStorage, l: &Layout) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::CudaStorageSlice as S;
    let stream = s.device.cuda_stream();
    let (base, size) = match &s.slice {
        S::F32(v) => (v.device_ptr(&stream).0, 4),
        S::BF16(v) => (v.device_ptr(&stream).0, 2),
        S::F16(v) => (v.device_ptr(&stream).0, 2),
        S::U32(v) => (v.device_ptr(&stream).0, 4),
        S::U8(v) => (v.device_ptr(&stream).0, 1),
        S::I64(v) => (v.device_ptr(&stream).0, 8),
        S::F64(v) => (v.device_ptr(&stream).0, 8),
        _ => bail!("no CUDA kernel for {:?}", BackendStorage::dtype(s)),
    };
    Ok(base + (l.start_offset() * size) as u64)
}

/// `n` uninitialised elements (every kernel writing into one writes all of them).
fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers' kernels write every element before anything reads it.
    unsafe { dev.alloc::<T>(n) }
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

impl GpuStorage for CudaStorage {
    fn dtype(&self) -> DType {
        BackendStorage::dtype(self)
    }

    fn alloc(&self, dt: DType, n: usize) -> Result<Self> {
        let dev = &self.device;
        Ok(match dt {
            DType::F32 => wrap(alloc::<f32>(dev, n)?, dev),
            DType::BF16 => wrap(alloc::<half::bf16>(dev, n)?, dev),
            DType::F16 => wrap(alloc::<half::f16>(dev, n)?, dev),
            dt => bail!("no CUDA kernel for {dt:?}"),
        })
    }

    fn ptr(&self, l: &Layout) -> Result<Arg> {
        Ok(Arg::Ptr {
            addr: ptr(self, l)?,
            dtype: Some(BackendStorage::dtype(self)),
        })
    }

    fn tensor_ptr(&self, t: &Tensor) -> Result<(Arg, Option<Self>)> {
        let a = with_storage(t, GpuStorage::ptr)?;
        Ok((a, None))
    }

    fn with_tensor<R>(&self, t: &Tensor, f: impl FnOnce(&Self, &Layout) -> Result<R>) -> Result<R> {
        with_storage(t, f)
    }

    fn launch(&self, mut l: Launch) -> Result<()> {
        l.check()?;
        let dev = &self.device;
        let (m, code) = ptx(l.module);
        let f = dev
            .get_or_load_custom_func(&l.name, m, code)?
            .into_cuda_function();
        if l.smem_opt_in > 0 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                l.smem_opt_in as i32,
            )
            .w()?;
        }
        let mut params = l.params();
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let [gx, gy, gz] = l.cfg.grid;
        let [bx, by, bz] = l.cfg.block;
        // SAFETY: `check` matched the arguments to the kernel's parameters; the pointers are
        // to live storages of this device, kept by the caller through the launch.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (gx, gy, gz),
                (bx, by, bz),
                l.cfg.shared,
                stream.cu_stream(),
                &mut params,
            )
        }
        .w()?;
        Ok(())
    }

    fn matmul(
        &self,
        rhs: &Self,
        bmnk: (usize, usize, usize, usize),
        lhs_l: &Layout,
        rhs_l: &Layout,
    ) -> Result<Self> {
        BackendStorage::matmul(self, rhs, bmnk, lhs_l, rhs_l)
    }
}

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
