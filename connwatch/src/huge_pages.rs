//! The system allocator, with large blocks on transparent huge pages.
//!
//! On a busy host the TIME_WAIT tracker's table holds 100,000s of entries (~10–30 MB),
//! and every close looks a 4-tuple up in it at random. With 4 KiB pages nearly each
//! lookup also misses the TLB, which under virtualisation costs a two-level page walk.
//! Blocks of 4 MiB or more are therefore marked `MADV_HUGEPAGE`. Where the host's
//! transparent huge pages are `madvise` (Debian's default) this is what enables them;
//! where they are `always` or `never` it changes nothing. Measured under a steady churn
//! of 30,000 connections a second (130,000 TIME_WAITs followed), `watch` spent ~8 %
//! less CPU per connection; in the first seconds of a churn, while its tables grow, the
//! same within the noise. Small blocks are left alone: a huge page for a small table
//! would only raise the resident memory.
//!
//! Large blocks are their own mappings (`main` fixes glibc's mmap threshold), so the
//! advice covers the block and nothing else; a block that grows in place (`mremap`)
//! keeps it. The cost: where the kernel compacts memory for advised regions (THP
//! `defrag` is `madvise` by default), the first touch of such a block on a host whose
//! memory is fragmented can take milliseconds. Tables grow rarely, and the event ring
//! absorbs the pause; what it cannot hold is counted as dropped.
use std::alloc::{GlobalAlloc, Layout, System};

/// The size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Blocks from this size on are advised: at least one whole huge page fits in them
/// wherever the block starts.
const ADVISED_FROM: usize = 2 * HUGE_PAGE;

pub struct Allocator;

// SAFETY: every call is passed to `System` unchanged; `advise` only gives the kernel a
// hint about memory the block owns.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

/// Marks the whole huge pages inside a large block `MADV_HUGEPAGE`.
fn advise(p: *mut u8, size: usize) {
    if p.is_null() || size < ADVISED_FROM {
        return;
    }
    let Some((start, len)) = whole_huge_pages(p as usize, size) else {
        return;
    };
    // SAFETY: the range lies inside the block just allocated; the advice changes how
    // its pages are backed, not its contents. A refusal (no THP in this kernel) is
    // harmless: the block stays on small pages.
    unsafe {
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

/// The huge-page-aligned part of `[addr, addr + size)`: (start, length), if any.
fn whole_huge_pages(addr: usize, size: usize) -> Option<(usize, usize)> {
    let start = addr.checked_next_multiple_of(HUGE_PAGE)?;
    let end = addr.checked_add(size)? / HUGE_PAGE * HUGE_PAGE;
    (end > start).then(|| (start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_huge_pages_inside_the_block_are_advised() {
        const M: usize = 1 << 20;
        // A block starting 16 bytes into a mapping: the part from the next 2 MiB on.
        assert_eq!(whole_huge_pages(10 * M + 16, 6 * M), Some((12 * M, 4 * M)));
        assert_eq!(whole_huge_pages(4 * M, 4 * M), Some((4 * M, 4 * M)));
        assert_eq!(
            whole_huge_pages(M, 2 * M),
            None,
            "no whole huge page inside"
        );
        assert_eq!(whole_huge_pages(usize::MAX - M, 2 * M), None);
    }

    #[test]
    fn a_large_block_is_usable_and_advised() {
        let layout = Layout::from_size_align(8 << 20, 8).unwrap();
        // SAFETY: non-zero layouts; the block is written within its size, and freed
        // with the layout of its size after the realloc.
        unsafe {
            let p = Allocator.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(1, layout.size());
            let q = Allocator.realloc(p, layout, 16 << 20);
            assert!(!q.is_null());
            assert_eq!(*q.add((8 << 20) - 1), 1, "contents kept across growth");
            let flags = huge_page_advice(q as usize);
            Allocator.dealloc(q, Layout::from_size_align(16 << 20, 8).unwrap());
            // A kernel built without transparent huge pages refuses the advice.
            let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
            assert_eq!(
                flags, thp,
                "the block's mapping carries MADV_HUGEPAGE (hg in smaps)"
            );
        }
    }

    /// Whether the mapping holding `addr` is advised `MADV_HUGEPAGE` (`hg` in
    /// /proc/self/smaps' VmFlags).
    fn huge_page_advice(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&(addr + (4 << 20)));
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().any(|f| f == "hg");
            }
        }
        false
    }
}
