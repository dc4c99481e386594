//! The kernel BTF that aya's program loads are given, made small.
//!
//! aya 0.14 needs an `aya::Btf` to load the `tp_btf` and iterator programs, and reads
//! only one thing from it: the type id of the program's attach target, looked up by
//! name (`btf_trace_<tracepoint>`, a typedef; `bpf_iter_<target>`, a function). A full
//! parse of the kernel's BTF for that cost ~30 ms and ~18 MB of fresh memory at every
//! start, beside the parse `offsets` makes with btf_rs anyway. That scan now also
//! notes the targets' ids, and the `aya::Btf` built here holds those names at those
//! ids, every other id a placeholder: the kernel checks an attach target against its
//! own BTF, so the ids are all that must be right.
//!
//! `EbpfLoader::new()` parses the kernel's BTF as well, unconditionally (for CO-RE
//! relocations, which this probe has none of; aya 0.15 parses lazily but needs a newer
//! rustc than we can assume). `loader_without_parse` builds it where that file does not
//! exist.
use anyhow::{Context as _, Result};
use aya::{Btf, EbpfLoader, Endianness};

/// A program's attach target in the kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `btf_trace_<name>`, what a `tp_btf` program attaches to.
    Typedef,
    /// `bpf_iter_<name>`, what an iterator program attaches to.
    Func,
}

/// The attach targets of the programs loaded with BTF.
pub const TARGETS: [(&str, Kind); 3] = [
    ("btf_trace_inet_sock_set_state", Kind::Typedef),
    ("bpf_iter_tcp", Kind::Func),
    ("bpf_iter_task_file", Kind::Func),
];

/// A target found in the kernel's BTF: its name and kind (from `TARGETS`), and its id.
pub type Found = (&'static str, Kind, u32);

/// The entry of `TARGETS` with this name and kind, if any.
pub fn target(name: &str, kind: Kind) -> Option<(&'static str, Kind)> {
    TARGETS
        .iter()
        .copied()
        .find(|&(n, k)| n == name && k == kind)
}

// BTF's encoding (include/uapi/linux/btf.h).
const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: u32 = 24;
const KIND_PTR: u32 = 2;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;

/// An `aya::Btf` in which each found target has its name and id, and every lower id a
/// pointer to void (a 12-byte type aya reads without allocating).
pub fn btf(found: &[Found]) -> Result<Btf> {
    let bytes = encode(found);
    Btf::parse(&bytes, Endianness::default()).context("cannot build the programs' attach BTF")
}

/// The raw BTF of `btf`.
fn encode(found: &[Found]) -> Vec<u8> {
    let last = found.iter().map(|&(_, _, id)| id).max().unwrap_or(0);
    let mut strings = vec![0u8];
    let mut named = Vec::with_capacity(found.len());
    for &(name, kind, id) in found {
        named.push((id, kind, strings.len() as u32));
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
    }
    let mut types = Vec::with_capacity(last as usize * 12);
    for id in 1..=last {
        let (kind, name_off) = match named.iter().find(|&&(i, _, _)| i == id) {
            Some(&(_, Kind::Typedef, off)) => (KIND_TYPEDEF, off),
            Some(&(_, Kind::Func, off)) => (KIND_FUNC, off),
            None => (KIND_PTR, 0),
        };
        // name_off, info (the kind in bits 24-28; no members, linkage static), type 0.
        for word in [name_off, kind << 24, 0] {
            types.extend_from_slice(&word.to_ne_bytes());
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN as usize + types.len() + strings.len());
    out.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
    out.extend_from_slice(&[1, 0]); // version, flags
    for word in [
        HEADER_LEN,
        0,                    // type_off
        types.len() as u32,   // type_len
        types.len() as u32,   // str_off
        strings.len() as u32, // str_len
    ] {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.extend_from_slice(&types);
    out.extend_from_slice(&strings);
    out
}

/// `EbpfLoader::new()` without its parse of the kernel's BTF, built on a thread of its
/// own (joined for the loader) whose root directory (its own, after
/// `unshare(CLONE_FS)`) holds no `/sys/kernel/btf`: the parse fails at once and the
/// loader has no BTF, as if `.btf(None)` had been set. Where the root cannot be changed
/// (no CAP_SYS_CHROOT), the loader parses as usual.
pub fn loader_without_parse() -> std::thread::JoinHandle<EbpfLoader<'static>> {
    std::thread::spawn(|| {
        if let Err(e) = leave_root() {
            log::debug!("the loader parses the kernel's BTF: {e}");
        }
        EbpfLoader::new()
    })
}

/// Gives this thread a root of its own, `/proc/self/fdinfo` (which only holds numbered
/// files). It changes nothing for the other threads.
fn leave_root() -> std::io::Result<()> {
    // SAFETY: plain syscalls on this thread's own filesystem attributes.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 || libc::chroot(c"/proc/self/fdinfo".as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use aya_obj::btf::BtfKind;

    use super::*;

    #[test]
    fn targets_keep_their_ids() {
        let found = [
            ("bpf_iter_tcp", Kind::Func, 7),
            ("btf_trace_inet_sock_set_state", Kind::Typedef, 3),
        ];
        let btf = btf(&found).unwrap();
        let id = |name, kind| btf.id_by_type_name_kind(name, kind).ok();
        assert_eq!(id("bpf_iter_tcp", BtfKind::Func), Some(7));
        assert_eq!(
            id("btf_trace_inet_sock_set_state", BtfKind::Typedef),
            Some(3)
        );
        // Found by name and kind only.
        assert_eq!(id("bpf_iter_tcp", BtfKind::Typedef), None);
        assert_eq!(id("bpf_iter_task_file", BtfKind::Func), None);
    }

    #[test]
    fn nothing_found_is_an_empty_btf() {
        let btf = btf(&[]).unwrap();
        assert!(
            btf.id_by_type_name_kind("bpf_iter_tcp", BtfKind::Func)
                .is_err()
        );
    }

    /// The ids offsets' scan finds are the ones a full parse by aya gives (this machine
    /// has kernel BTF, as every kernel with tp_btf).
    #[test]
    fn ids_match_a_full_parse_of_this_kernel() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        let resolved = super::super::offsets::resolve(path).unwrap();
        assert_eq!(resolved.attach_targets.len(), TARGETS.len());
        let small = btf(&resolved.attach_targets).unwrap();
        let full = Btf::parse_file(path, Endianness::default()).unwrap();
        for (name, kind) in TARGETS {
            let kind = match kind {
                Kind::Typedef => BtfKind::Typedef,
                Kind::Func => BtfKind::Func,
            };
            let want = full.id_by_type_name_kind(name, kind).unwrap();
            assert_eq!(
                small.id_by_type_name_kind(name, kind).unwrap(),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn the_changed_root_is_this_threads_alone() {
        let vmlinux = "/sys/kernel/btf/vmlinux";
        let inside = std::thread::spawn(move || {
            leave_root().unwrap();
            std::path::Path::new(vmlinux).exists()
        })
        .join()
        .unwrap();
        assert!(!inside, "{vmlinux} is still there after leave_root");
        assert!(std::path::Path::new(vmlinux).exists());
    }
}
