//! The MPI process of a run launched by mpirun or srun.
use crate::{check_root, Comm, DistError, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

/// One MPI process: the world communicator, and the rank among the processes of its node
/// (MPI_Comm_split_type SHARED). MPI is finalised when it is dropped.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    // Dropped last: MPI_Finalize.
    _universe: Universe,
}

impl MpiComm {
    /// MPI_Init_thread (FUNNELED: every MPI call comes from the thread that initialised it,
    /// the training thread). MPI's default error handler aborts the job on a failed call, so
    /// a rank that dies ends the others rather than leaving them waiting.
    pub fn init() -> Result<Self> {
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| DistError::Mpi("MPI was already initialised".into()))?;
        let world = universe.world();
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            local_rank,
            _universe: universe,
        })
    }

    fn root(&self, root: usize) -> Result<mpi::topology::Process<'_>> {
        check_root(root, self.size)?;
        Ok(self.world.process_at_rank(root as i32))
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let proc = self.root(root)?;
        let mut len = buf.len() as u64;
        proc.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        if len > 0 {
            proc.broadcast_into(&mut buf[..]);
        }
        Ok(())
    }
    fn gather_bytes(&self, mine: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let proc = self.root(root)?;
        let len = Count::try_from(mine.len()).map_err(|_| {
            DistError::Protocol(format!("{} bytes: too many to gather", mine.len()))
        })?;
        if self.rank != root {
            proc.gather_into(&len);
            proc.gather_varcount_into(mine);
            return Ok(None);
        }
        let mut counts = vec![0 as Count; self.size];
        proc.gather_into_root(&len, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            proc.gather_varcount_into_root(mine, &mut part);
        }
        Ok(Some(
            counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect(),
        ))
    }
    fn allgather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        crate::check_counts(mine.len(), counts, self.rank, self.size)?;
        let counts: Vec<Count> = counts
            .iter()
            .map(|&c| Count::try_from(c))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                DistError::Protocol(format!("all-gather of {counts:?}: too many values"))
            })?;
        let displs: Vec<Count> = counts
            .iter()
            .scan(0 as Count, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0f32; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(all)
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
