//! NCCL for CUDA tensors (the `cuda` feature): the ranks' NCCL communicator, made from a unique
//! id that rank 0 creates and MPI broadcasts, and the sum of a CUDA tensor over the ranks
//! (ncclAllReduce on the device's stream, as a candle op).
use crate::{Comm, DistError, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};

/// This rank's NCCL communicator, on its GPU.
pub struct Nccl {
    comm: NcclComm,
}

fn nccl_err(e: impl std::fmt::Debug) -> DistError {
    DistError::Mpi(format!("NCCL: {e:?}"))
}

impl Nccl {
    /// Every rank calls this together with its GPU: rank 0 creates the unique id, `comm`
    /// (MPI) broadcasts it, each rank joins the NCCL communicator as its MPI rank.
    pub fn connect(comm: &dyn Comm, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(DistError::Protocol(
                "NCCL needs a CUDA device; CPU tensors are summed by MPI".into(),
            ));
        };
        let mut bytes: Vec<u8> = if comm.is_root() {
            let id = Id::new().map_err(nccl_err)?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        comm.broadcast_bytes(&mut bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(DistError::Protocol(format!(
                "NCCL unique id of {} bytes, expected {}",
                bytes.len(),
                internal.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = NcclComm::from_rank(
            dev.cuda_stream(),
            comm.rank(),
            comm.world(),
            Id::uninit(internal),
        )
        .map_err(nccl_err)?;
        Ok(Self { comm })
    }

    /// `t` (f32, on this rank's GPU) summed over every rank.
    pub fn allreduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&AllReduce { comm: &self.comm })?)
    }
}

struct AllReduce<'a> {
    comm: &'a NcclComm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce of a CPU tensor: CPU tensors are summed by MPI")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the tensor is not contiguous")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        let mut dst = dev.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
