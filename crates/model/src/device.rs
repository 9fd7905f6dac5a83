//! Opening the device a model runs on: `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU when
//! the build has CUDA and one is there, else the CPU). A CUDA device is tuned for training on
//! opening (see `ops::cuda::tune_device`): freed memory stays in the pool, and tensors skip
//! per-use event records.
use candle_core::{bail, Device, Result};

/// The device named by `spec`. Also refuses an unknown `SFT_KERNELS` (see
/// [`crate::ops::kernels_setting`]) before anything runs.
pub fn open(spec: &str) -> Result<Device> {
    if crate::ops::kernels_setting()? == crate::ops::KernelsSetting::Emu
        && spec.trim().starts_with("cuda")
    {
        bail!(
            "SFT_KERNELS=emu runs the CUDA kernels on an emulated GPU on the CPU: the device must \
             be `cpu` (got `{}`)",
            spec.trim()
        );
    }
    let dev = match spec.trim() {
        "cpu" => return Ok(Device::Cpu),
        "auto" => Device::cuda_if_available(0)?,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    candle_core::Error::Msg(format!("bad device `{s}`: expected cuda:N"))
                })?,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device `{s}`: this build has no CUDA support (build it with scripts/build-cuda.sh)");
            }
            Device::new_cuda(n)?
        }
        s => bail!("unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"),
    };
    tune(&dev)?;
    Ok(dev)
}

/// Applies the CUDA settings above to a device opened elsewhere (a no-op on the CPU).
pub fn tune(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        crate::ops::cuda::tune_device(d)?;
    }
    let _ = dev;
    Ok(())
}

/// The GPU memory pool's high-water marks since the last [`reset_peak_memory`] (bytes in use
/// by tensors, bytes reserved from the driver); `None` on the CPU.
pub fn peak_memory(dev: &Device) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return crate::ops::cuda::peak_memory(d).map(Some);
    }
    let _ = dev;
    Ok(None)
}

/// Restarts [`peak_memory`]'s high-water marks.
pub fn reset_peak_memory(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return crate::ops::cuda::reset_peak_memory(d);
    }
    let _ = dev;
    Ok(())
}

/// Waits for the device's queued work (timing on a GPU).
pub fn synchronize(dev: &Device) -> Result<()> {
    dev.synchronize()
}
