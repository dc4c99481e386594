//! From a capture to the addresses of its stack. The kernel's frame-pointer walk misses
//! the caller of a function that keeps no frame (glibc's syscall wrappers: the caller's
//! return address sits at the stack pointer, which the walk never reads) and gets lost
//! in code built without frame pointers. So the copied top of the stack is unwound with
//! the binaries' unwind tables (framehop over `.eh_frame`; frame pointers where a
//! module has none, as in Go), and where that copy ends the kernel's walk takes over
//! from the first frame both agree on.
use framehop::{
    FrameAddress, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};

use super::record::Capture;

/// Most frames kept per stack.
pub const MAX_FRAMES: usize = 64;

/// A stack's addresses: the instruction pointer, then return addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unwound {
    pub addrs: Vec<u64>,
    /// The unwinder reached the outermost frame (rather than the end of the copy or
    /// of what it could read).
    pub complete: bool,
}

/// Unwinds the copied stack of `c` with `unwinder` (the modules of its process), then
/// joins the kernel's walk (`splice`).
pub fn unwind<D: std::ops::Deref<Target = [u8]>>(
    c: &Capture,
    unwinder: &UnwinderX86_64<D>,
    cache: &mut CacheX86_64,
) -> Unwound {
    let mut tables = Unwound::default();
    if c.ip != 0 && c.sp != 0 && !c.stack.is_empty() {
        let mut read = |addr: u64| c.word(addr).ok_or(());
        let regs = UnwindRegsX86_64::new(c.ip, c.sp, c.bp);
        let mut frames = unwinder.iter_frames(c.ip, regs, cache, &mut read);
        loop {
            match frames.next() {
                Ok(Some(frame)) => {
                    let a = match frame {
                        FrameAddress::InstructionPointer(a) => a,
                        FrameAddress::ReturnAddress(a) => a.get(),
                    };
                    if tables.addrs.len() >= MAX_FRAMES || a == 0 {
                        break;
                    }
                    tables.addrs.push(a);
                }
                Ok(None) => {
                    tables.complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    splice(tables, &c.frames)
}

/// Joins the unwound top of a stack and the kernel's frame-pointer walk: the unwound
/// frames, then the walk's frames after the last unwound frame it also holds. Where
/// they share none, the unwound frames stand alone (a walk that shares no frame is
/// lost in code without frame pointers); where nothing was unwound, the walk does.
pub fn splice(tables: Unwound, walk: &[u64]) -> Unwound {
    if tables.addrs.len() <= 1 {
        return Unwound {
            addrs: walk.iter().copied().take(MAX_FRAMES).collect(),
            complete: false,
        };
    }
    if tables.complete {
        return tables;
    }
    // The deepest unwound frame the walk also reached; the walk's first frame (the
    // instruction pointer) always matches the unwound one and says nothing.
    let joint = tables
        .addrs
        .iter()
        .enumerate()
        .skip(1)
        .rev()
        .find_map(|(i, a)| walk.iter().skip(1).position(|w| w == a).map(|j| (i, j + 1)));
    match joint {
        Some((i, j)) => {
            let mut addrs = tables.addrs.get(..=i).unwrap_or_default().to_vec();
            addrs.extend(walk.get(j + 1..).unwrap_or_default());
            addrs.truncate(MAX_FRAMES);
            Unwound {
                addrs,
                complete: false,
            }
        }
        None => tables,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::record::{At, synthetic};

    /// A walk that skipped `handler` (0x20) under a frameless wrapper: the tables found
    /// it, and the walk goes on below where both agree.
    #[test]
    fn the_unwound_caller_is_kept_and_the_walk_continues_below() {
        let walk = [0x10, 0x30, 0x40, 0x50];
        let tables = Unwound {
            addrs: vec![0x10, 0x20, 0x30],
            complete: false,
        };
        let s = splice(tables, &walk);
        assert_eq!(s.addrs, vec![0x10, 0x20, 0x30, 0x40, 0x50]);
    }

    #[test]
    fn a_complete_unwind_stands_and_a_lost_walk_is_ignored() {
        let tables = Unwound {
            addrs: vec![0x10, 0x20, 0x30],
            complete: true,
        };
        assert_eq!(splice(tables.clone(), &[0x10, 0x99]).addrs, tables.addrs);
        let partial = Unwound {
            complete: false,
            ..tables.clone()
        };
        // No frame in common (a walk through code without frame pointers): the
        // unwound frames alone.
        assert_eq!(splice(partial, &[0x10, 0x99, 0x98]).addrs, tables.addrs);
    }

    #[test]
    fn without_a_copy_the_walk_is_the_stack() {
        let s = splice(Unwound::default(), &[0x10, 0x30]);
        assert_eq!(s.addrs, vec![0x10, 0x30]);
        assert!(!s.complete);
    }

    /// With no module known, framehop falls back to frame pointers over the copy: the
    /// frame chain laid out in the copied stack is followed.
    #[test]
    fn frame_pointers_in_the_copy_are_followed() {
        let sp = 0x1000;
        // [sp] = saved rbp -> 0x1010, [sp+8] = return 0x20; [0x1010] = 0 (end),
        // [0x1018] = return 0x30.
        let stack = [0x1010, 0x20, 0, 0x30];
        let mut c = synthetic(At::Eof, &[0x10, 0x20], sp, &stack);
        c.bp = sp;
        let unwinder: UnwinderX86_64<Vec<u8>> = UnwinderX86_64::new();
        let u = unwind(&c, &unwinder, &mut CacheX86_64::new());
        assert_eq!(&u.addrs[..3], &[0x10, 0x20, 0x30], "{:x?}", u.addrs);
    }
}
