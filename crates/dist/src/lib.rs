//! sft-dist: the processes of a data-parallel run and what they say to each other.
//!
//! [`Comm`] is everything the trainer needs: this process's rank, the world size, the rank
//! on this node (which GPU to open), a sum of f32/f64 buffers over every rank, a broadcast and
//! a gather of bytes, a barrier and an abort. [`Single`] is the one process of a plain run: no
//! MPI, every collective the identity. With the `mpi` feature, [`MpiComm`] is an MPI process
//! (launched by mpirun or srun): MPI_Allreduce, MPI_Bcast, MPI_Gatherv, MPI_Barrier, MPI_Abort.
//! [`connect`] picks one at run time from the launcher's environment.
//!
//! [`Reducer`] sums a list of tensors over the ranks in fixed-size buckets, in the list's
//! order, so that every rank ends with the same bits: MPI for CPU tensors
//! ([`allreduce_tensors`]), NCCL for CUDA tensors (the `cuda` feature: [`Nccl`], its unique id
//! broadcast over MPI).
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
pub use nccl::Nccl;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "this process was started by an MPI launcher with {world} processes ({var} is set), but \
         this build has no MPI: build it with `--features mpi` (Open MPI and libclang installed), \
         or run it without mpirun"
    )]
    NoMpi { world: usize, var: &'static str },
    #[error("MPI: {0}")]
    Mpi(String),
    #[error("gradient all-reduce: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// The processes of one run, as one of them sees them.
pub trait Comm {
    /// This process's rank, 0..world.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn world(&self) -> usize;
    /// This process's rank among those on its node (the GPU it opens).
    fn local_rank(&self) -> usize;
    /// Sums `buf` element-wise over every rank; every rank ends with the same sums.
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Comm::allreduce_sum_f32`], in f64 (losses, token counts, flags).
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank `root`'s bytes, on every rank (`buf` is replaced on the others).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Every rank's bytes, in rank order, on rank `root`; `None` on the others.
    fn gather_bytes(&self, mine: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>>;
    /// Every rank's f32 values concatenated in rank order, on every rank; rank `r` gives
    /// `counts[r]` values (the sharded optimizer's updated shares).
    fn allgather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    fn barrier(&self) -> Result<()>;
    /// Ends every process of the run with `code` (MPI_Abort): a rank that failed alone must
    /// not leave the others waiting in a collective.
    fn abort(&self, code: i32) -> !;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Whether `flag` is set on any rank.
    fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(flag))];
        self.allreduce_sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }
}

/// The one process of a run started without MPI.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn allreduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn gather_bytes(&self, mine: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        check_root(root, 1)?;
        Ok(Some(vec![mine.to_vec()]))
    }
    fn allgather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(mine.len(), counts, 0, 1)?;
        Ok(mine.to_vec())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// `counts` has a count for every rank, and this rank's is `mine`.
fn check_counts(mine: usize, counts: &[usize], rank: usize, world: usize) -> Result<()> {
    if counts.len() == world && counts.get(rank) == Some(&mine) {
        Ok(())
    } else {
        Err(DistError::Protocol(format!(
            "all-gather: rank {rank} gives {mine} values, counts {counts:?} for {world} ranks"
        )))
    }
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root < world {
        Ok(())
    } else {
        Err(DistError::Protocol(format!(
            "root rank {root} outside a world of {world}"
        )))
    }
}

/// The environment variables by which launchers tell a process how many were started:
/// Open MPI's mpirun, PMI-1/2 (MPICH's hydra, srun --mpi=pmi2), and srun itself (a job step's
/// task count, whatever its MPI plugin).
const LAUNCHER_WORLD_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];

/// The world size a launcher announced in the environment, and the variable that said so.
pub fn launcher_world() -> Option<(usize, &'static str)> {
    LAUNCHER_WORLD_VARS.iter().find_map(|&var| {
        let n = std::env::var(var).ok()?.trim().parse::<usize>().ok()?;
        Some((n, var))
    })
}

/// This process's rank as the launcher announced it (0 without a launcher): known before
/// MPI starts, for the logging set up first.
pub fn launcher_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse::<usize>().ok())
        .filter(|_| launcher_world().is_some_and(|(n, _)| n > 1))
        .unwrap_or(0)
}

/// This process's view of the run: an MPI process when a launcher started several (and the
/// build has MPI), else the single process of a plain run. MPI is initialised only when a
/// launcher started more than one process, so a plain run never touches MPI.
pub fn connect() -> Result<Box<dyn Comm>> {
    match launcher_world() {
        None | Some((0 | 1, _)) => Ok(Box::new(Single)),
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(MpiComm::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some((world, var)) => Err(DistError::NoMpi { world, var }),
    }
}

/// Elements per all-reduce bucket: 8 Mi floats, 32 MiB.
pub const BUCKET_ELEMENTS: usize = 8 << 20;

/// What one [`allreduce_tensors`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReduceStats {
    /// Bytes each rank sent into the all-reduces (f32 elements x 4).
    pub bytes: u64,
    pub buckets: u64,
    /// Time in the all-reduce calls themselves (not the flattening).
    pub reduce: Duration,
    /// Everything: flattening, the all-reduces, the tensors rebuilt.
    pub total: Duration,
}

/// The buckets of `tensors`: consecutive runs of at most `bucket_elements` elements (a tensor
/// larger than that is a bucket of its own), in order.
fn buckets(tensors: &[Tensor], bucket_elements: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tensors.len() {
        let (mut end, mut elements) = (start, 0);
        while end < tensors.len()
            && (end == start || elements + tensors[end].elem_count() <= bucket_elements)
        {
            elements += tensors[end].elem_count();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Sums `tensors` over every rank by MPI, in place: flattened to f32 in the slice's order into
/// buckets of at most `bucket_elements` (a tensor larger than that is a bucket of its own),
/// each bucket one all-reduce. Every rank must pass tensors of the same shapes in the same
/// order; every rank ends with the same values. Tensors keep their dtype and device (an f64
/// tensor is summed in f32). With one process nothing is copied.
pub fn allreduce_tensors(
    comm: &dyn Comm,
    tensors: &mut [Tensor],
    bucket_elements: usize,
) -> Result<ReduceStats> {
    let mut stats = ReduceStats::default();
    if comm.world() == 1 {
        return Ok(stats);
    }
    let t0 = Instant::now();
    for bucket in buckets(tensors, bucket_elements) {
        let mut flat = Vec::new();
        for t in &tensors[bucket.clone()] {
            flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        let tr = Instant::now();
        comm.allreduce_sum_f32(&mut flat)?;
        stats.reduce += tr.elapsed();
        stats.bytes += 4 * flat.len() as u64;
        stats.buckets += 1;
        let mut offset = 0;
        for t in &mut tensors[bucket] {
            let n = t.elem_count();
            let summed = Tensor::from_slice(&flat[offset..offset + n], t.shape(), t.device())?;
            *t = summed.to_dtype(t.dtype())?;
            offset += n;
        }
    }
    stats.total = t0.elapsed();
    Ok(stats)
}

/// Sums the gradients of a step over the ranks: MPI for CPU tensors; NCCL for CUDA tensors
/// (the `cuda` feature, on a CUDA device with more than one rank).
pub struct Reducer<'c> {
    comm: &'c dyn Comm,
    #[cfg(feature = "cuda")]
    nccl: Option<Nccl>,
}

impl<'c> Reducer<'c> {
    /// Every rank calls this together, with the device its gradients live on. `nccl_alone`:
    /// sum through NCCL even with one process (a check of NCCL on one GPU); refused where it
    /// cannot apply (a build without NCCL, a CPU device) rather than silently not done.
    pub fn new(comm: &'c dyn Comm, device: &candle_core::Device, nccl_alone: bool) -> Result<Self> {
        if nccl_alone && !device.is_cuda() {
            return Err(DistError::Protocol(format!(
                "NCCL was asked for with one process, but the model is on {device:?}: NCCL sums \
                 CUDA tensors (model.device: cuda)"
            )));
        }
        #[cfg(feature = "cuda")]
        let nccl = if (comm.world() > 1 || nccl_alone) && device.is_cuda() {
            Some(Nccl::connect(comm, device)?)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        if nccl_alone {
            return Err(DistError::Protocol(
                "NCCL was asked for with one process, but this build has no NCCL: build with \
                 `scripts/build-cuda.sh --release -p sft-cli --bins --features nccl`"
                    .into(),
            ));
        }
        Ok(Self {
            comm,
            #[cfg(feature = "cuda")]
            nccl,
        })
    }

    /// Whether gradients are summed on the GPUs by NCCL.
    pub fn on_gpus(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.nccl.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// `tensors` summed over the ranks, in place, in `bucket_elements` buckets in their order.
    pub fn allreduce(&self, tensors: &mut [Tensor], bucket_elements: usize) -> Result<ReduceStats> {
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return allreduce_on_gpus(nccl, tensors, bucket_elements);
        }
        allreduce_tensors(self.comm, tensors, bucket_elements)
    }
}

/// [`allreduce_tensors`] for CUDA tensors by NCCL: each bucket concatenated on the GPU, summed
/// by ncclAllReduce, cut back into the tensors.
#[cfg(feature = "cuda")]
fn allreduce_on_gpus(
    nccl: &Nccl,
    tensors: &mut [Tensor],
    bucket_elements: usize,
) -> Result<ReduceStats> {
    let mut stats = ReduceStats::default();
    let t0 = Instant::now();
    for bucket in buckets(tensors, bucket_elements) {
        let flat: Vec<Tensor> = tensors[bucket.clone()]
            .iter()
            .map(|t| t.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let tr = Instant::now();
        let summed = nccl.allreduce_sum(&flat)?;
        summed.device().synchronize()?;
        stats.reduce += tr.elapsed();
        stats.bytes += 4 * flat.elem_count() as u64;
        stats.buckets += 1;
        let mut offset = 0;
        for t in &mut tensors[bucket] {
            let n = t.elem_count();
            *t = summed
                .narrow(0, offset, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            offset += n;
        }
    }
    stats.total = t0.elapsed();
    Ok(stats)
}

/// Which of `n` items (prompts, held-out examples) rank `rank` of `world` takes: a contiguous
/// share, the first `n % world` ranks one more, so that the shares concatenated in rank order
/// are the items in order.
pub fn share(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shares_cover_the_items_in_order() {
        for n in 0..12 {
            for world in 1..5 {
                let all: Vec<usize> = (0..world).flat_map(|r| share(n, r, world)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
                let sizes: Vec<usize> = (0..world).map(|r| share(n, r, world).len()).collect();
                let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{sizes:?}");
            }
        }
    }

    /// The only test here that sets the launcher's variables (tests run in threads of one
    /// process).
    #[cfg(not(feature = "mpi"))]
    #[test]
    fn a_build_without_mpi_runs_alone_and_refuses_several_processes() {
        assert!(connect().is_ok_and(|c| c.world() == 1));
        std::env::set_var("OMPI_COMM_WORLD_SIZE", "1");
        assert!(connect().is_ok_and(|c| c.world() == 1));
        std::env::set_var("OMPI_COMM_WORLD_SIZE", "2");
        let refused = connect().err().map(|e| e.to_string());
        std::env::remove_var("OMPI_COMM_WORLD_SIZE");
        let msg = refused.unwrap_or_default();
        assert!(
            msg.contains("2 processes") && msg.contains("--features mpi"),
            "{msg}"
        );
    }

    #[test]
    fn a_single_process_is_rank_zero_of_one_and_keeps_its_values() {
        let c = Single;
        assert_eq!((c.rank(), c.world(), c.local_rank()), (0, 1, 0));
        let mut v = [1.5f32, -2.0];
        c.allreduce_sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert!(c.any(true).unwrap() && !c.any(false).unwrap());
        assert_eq!(
            c.gather_bytes(b"abc", 0).unwrap(),
            Some(vec![b"abc".to_vec()])
        );
        assert!(c.gather_bytes(b"abc", 1).is_err());
        assert_eq!(c.allgather_f32(&[1.0, 2.0], &[2]).unwrap(), vec![1.0, 2.0]);
        assert!(c.allgather_f32(&[1.0], &[2]).is_err());
        assert!(c.allgather_f32(&[1.0], &[1, 1]).is_err());
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut ts = [t.clone()];
        let stats = allreduce_tensors(&c, &mut ts, 4).unwrap();
        assert_eq!(stats.bytes, 0);
        assert_eq!(ts[0].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    /// A world of `n` ranks inside one process, each "rank" a view holding the sum that the
    /// others contributed: the all-reduce as MPI would leave it, for testing the bucketing.
    struct Replicas {
        n: usize,
        calls: std::cell::RefCell<Vec<usize>>,
    }

    impl Comm for Replicas {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            self.n
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            // Every rank holds the same values: the sum is n times them.
            self.calls.borrow_mut().push(buf.len());
            for x in buf {
                *x *= self.n as f32;
            }
            Ok(())
        }
        fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            for x in buf {
                *x *= self.n as f64;
            }
            Ok(())
        }
        fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
            Ok(())
        }
        fn gather_bytes(&self, mine: &[u8], _root: usize) -> Result<Option<Vec<Vec<u8>>>> {
            Ok(Some(vec![mine.to_vec(); self.n]))
        }
        fn allgather_f32(&self, mine: &[f32], _counts: &[usize]) -> Result<Vec<f32>> {
            Ok(mine.repeat(self.n))
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }

    #[test]
    fn buckets_follow_the_order_and_size_and_keep_shapes_and_dtypes() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1f64, 2.0], &dev).unwrap();
        let c = Tensor::arange(0f32, 10.0, &dev).unwrap();
        let d = Tensor::new(&[7f32], &dev).unwrap();
        let comm = Replicas {
            n: 3,
            calls: Default::default(),
        };
        let mut ts = [a, b, c, d];
        let stats = allreduce_tensors(&comm, &mut ts, 8).unwrap();
        // a+b fit 8; c alone is larger than a bucket; d starts the next.
        assert_eq!(*comm.calls.borrow(), vec![8, 10, 1]);
        assert_eq!(stats.buckets, 3);
        assert_eq!(stats.bytes, 4 * 19);
        assert_eq!(ts[0].dims(), &[2, 3]);
        assert_eq!(
            ts[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
        );
        assert_eq!(ts[1].dtype(), DType::F64);
        assert_eq!(ts[1].to_vec1::<f64>().unwrap(), vec![3.0, 6.0]);
        assert_eq!(ts[2].to_vec1::<f32>().unwrap()[9], 27.0);
        assert_eq!(ts[3].to_vec1::<f32>().unwrap(), vec![21.0]);
    }
}
