//! Who holds which socket, listed by the kernel in one pass: the probe's `iter/task_file`
//! program writes a (pid, fd, inode) record for each socket among every process's open
//! files. Walking /proc instead costs a readlink per fd of every process (what `ss -p`
//! does); the iterator reads only what it keeps. Used for the fd index wherever the
//! kernel has BTF (iterators need it, 5.8 or later); /proc remains the fallback.
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, anyhow};
use aya::{Btf, Ebpf, programs::Iter};
use connwatch_common::{PROG_SOCKET_FDS, SocketFd};

use super::iter_file::for_each_batch;

/// The loaded iterator; each `scan` is one pass over every task's files.
pub struct SocketFds {
    ebpf: Arc<Mutex<Ebpf>>,
}

impl SocketFds {
    /// Loads the iterator program of the probe object.
    pub fn load(ebpf: &Arc<Mutex<Ebpf>>, btf: &Btf) -> Result<Self> {
        let mut guard = ebpf.lock().map_err(|_| anyhow!("probe lock poisoned"))?;
        let prog: &mut Iter = guard
            .program_mut(PROG_SOCKET_FDS)
            .context("the probe has no socket-fd iterator")?
            .try_into()?;
        prog.load("task_file", btf)
            .context("cannot load the socket-fd iterator")?;
        drop(guard);
        Ok(Self {
            ebpf: Arc::clone(ebpf),
        })
    }

    /// Every (pid, inode) of a socket held open by a process, from one pass.
    pub fn scan(&self) -> Result<Vec<SocketFd>> {
        let file = {
            let mut guard = self
                .ebpf
                .lock()
                .map_err(|_| anyhow!("probe lock poisoned"))?;
            let prog: &mut Iter = guard
                .program_mut(PROG_SOCKET_FDS)
                .context("the probe has no socket-fd iterator")?
                .try_into()?;
            // A link per pass: reading its iterator file to the end is the pass.
            let link = prog.attach()?;
            prog.take_link(link)?.into_file()?
        };
        let mut fds = Vec::new();
        for_each_batch(&file, size_of::<SocketFd>(), |batch| {
            fds.extend(parse(batch));
            Ok(())
        })
        .context("cannot read the socket-fd iterator")?;
        Ok(fds)
    }
}

impl crate::host::owners::SocketFdSource for SocketFds {
    fn socket_fds(&mut self) -> Option<Vec<(u32, u64)>> {
        match self.scan() {
            Ok(fds) => Some(fds.into_iter().map(|f| (f.pid, f.inode)).collect()),
            Err(e) => {
                log::debug!("socket-fd iterator failed, walking /proc: {e:#}");
                None
            }
        }
    }
}

/// The iterator's output: `SocketFd` records back to back.
pub fn parse(bytes: &[u8]) -> impl Iterator<Item = SocketFd> + '_ {
    bytes.chunks_exact(size_of::<SocketFd>()).map(|rec| {
        let u32_at = |at: usize| {
            rec.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_ne_bytes)
        };
        let u64_at = |at: usize| {
            rec.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes)
        };
        SocketFd {
            pid: u32_at(0),
            fd: u32_at(4),
            inode: u64_at(8),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_back_to_back_records() {
        let recs = [
            SocketFd {
                pid: 42,
                fd: 3,
                inode: 123_456,
            },
            SocketFd {
                pid: 7,
                fd: 10,
                inode: u64::from(u32::MAX) + 5,
            },
        ];
        let mut bytes = Vec::new();
        for r in recs {
            bytes.extend(r.pid.to_ne_bytes());
            bytes.extend(r.fd.to_ne_bytes());
            bytes.extend(r.inode.to_ne_bytes());
        }
        // A torn tail is ignored rather than misread.
        bytes.extend([1, 2, 3]);
        assert_eq!(parse(&bytes).collect::<Vec<_>>(), recs);
    }
}
