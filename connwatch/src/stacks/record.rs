//! A captured user stack as the probe wrote it (`StackRecord`), decoded.
use connwatch_common::{STACK_COPY, STACK_FRAMES, StackRecord, stack_at};
use serde::Serialize;

/// Where a stack was captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum At {
    /// connect(): where a client made the socket.
    Connect,
    /// accept(): where a server made it.
    Accept,
    /// A read that returned 0: where the process learnt of the hang-up.
    Eof,
}

impl At {
    pub fn as_str(self) -> &'static str {
        match self {
            At::Connect => "connect",
            At::Accept => "accept",
            At::Eof => "eof",
        }
    }

    /// Where the socket was made (as opposed to where its hang-up was read).
    pub fn made(self) -> bool {
        self != At::Eof
    }
}

/// One capture: the socket, the task, its registers, the kernel's frame-pointer walk
/// and the copied top of its stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub pid: u32,
    pub tid: u32,
    pub inode: u64,
    pub at: At,
    pub ts_ns: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Frame-pointer walk: the instruction pointer, then return addresses.
    pub frames: Vec<u64>,
    /// The user stack from `sp` up.
    pub stack: Vec<u8>,
}

impl Capture {
    /// The 8-byte word at `addr` of the copied stack, if it was copied.
    pub fn word(&self, addr: u64) -> Option<u64> {
        let at = usize::try_from(addr.checked_sub(self.sp)?).ok()?;
        let bytes = self.stack.get(at..at.checked_add(8)?)?;
        Some(u64::from_ne_bytes(bytes.try_into().ok()?))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Capture, String> {
    if bytes.len() < std::mem::size_of::<StackRecord>() {
        return Err(format!("stack record of {} bytes", bytes.len()));
    }
    // SAFETY: the length is checked above; `StackRecord` is plain data (every bit
    // pattern valid), read unaligned.
    let r: StackRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let at = match r.at {
        stack_at::CONNECT => At::Connect,
        stack_at::ACCEPT => At::Accept,
        stack_at::EOF => At::Eof,
        other => return Err(format!("unknown capture point {other}")),
    };
    let n = (r.nframes as usize).min(STACK_FRAMES);
    let len = (r.stack_len as usize).min(STACK_COPY);
    Ok(Capture {
        pid: r.pid,
        tid: r.tid,
        inode: r.inode,
        at,
        ts_ns: r.ts_ns,
        ip: r.ip,
        sp: r.sp,
        bp: r.bp,
        frames: r.frames.get(..n).unwrap_or_default().to_vec(),
        stack: r.stack.get(..len).unwrap_or_default().to_vec(),
    })
}

#[cfg(test)]
pub(crate) fn synthetic(at: At, frames: &[u64], sp: u64, stack: &[u64]) -> Capture {
    Capture {
        pid: 42,
        tid: 42,
        inode: 7,
        at,
        ts_ns: 1,
        ip: frames.first().copied().unwrap_or(0),
        sp,
        bp: 0,
        frames: frames.to_vec(),
        stack: stack.iter().flat_map(|w| w.to_ne_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_record_and_reads_its_stack() {
        let mut r: StackRecord = unsafe { std::mem::zeroed() };
        r.pid = 9;
        r.inode = 77;
        r.at = stack_at::EOF;
        r.nframes = 2;
        r.frames[0] = 0x1000;
        r.frames[1] = 0x2000;
        r.frames[2] = 0x3000; // beyond nframes: not a frame
        r.sp = 0x7000;
        r.stack_len = 16;
        r.stack[8..16].copy_from_slice(&0xabcd_u64.to_ne_bytes());
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const r).cast::<u8>(),
                std::mem::size_of::<StackRecord>(),
            )
        };
        let c = decode(bytes).unwrap();
        assert_eq!((c.pid, c.inode, c.at), (9, 77, At::Eof));
        assert_eq!(c.frames, vec![0x1000, 0x2000]);
        assert_eq!(c.word(0x7008), Some(0xabcd));
        assert_eq!(c.word(0x7010), None, "past the copy");
        assert_eq!(c.word(0x6ff8), None, "below the stack pointer");
        assert!(decode(&bytes[..100]).is_err());
    }
}
