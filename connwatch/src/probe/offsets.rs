//! Resolves the byte offsets of the kernel struct fields the probe reads, from the running
//! kernel's BTF (`/sys/kernel/btf/vmlinux`). aya has no CO-RE relocations and bindgen
//! output is frozen to one kernel build, so the offsets are looked up at start-up and
//! handed to the probe in its `OFFSETS` global. A field that cannot be found is reported
//! by name instead of being read at a wrong offset.
use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};
use btf_rs::{Btf, Type};
use connwatch_common::Offsets;

use super::attach_btf::{self, Kind};

/// Offsets for the probe, and which optional fields could not be resolved.
#[derive(Debug)]
pub struct Resolved {
    pub offsets: Offsets,
    /// Fields needed by the `tp_btf` hook that are missing (it cannot be used then).
    pub missing_required: Vec<&'static str>,
    /// Fields whose absence only blanks netns/inode in events.
    pub missing_optional: Vec<&'static str>,
    /// The programs' attach targets found, with their type ids (see `attach_btf`).
    pub attach_targets: Vec<attach_btf::Found>,
}

/// A field the probe reads: its name in messages, the struct it is found from, the
/// member path from that struct, and where its offset goes.
struct Field {
    name: &'static str,
    root: &'static str,
    path: &'static [&'static str],
    slot: fn(&mut Offsets) -> &mut u32,
}

// `struct sock` starts with `struct sock_common __sk_common`; `struct inet_sock` starts
// with `struct sock sk`: these paths give offsets from the `struct sock *`.
/// Fields without which the `tp_btf` hook cannot be used.
const REQUIRED: [Field; 8] = [
    Field {
        name: "skc_family",
        root: "sock",
        path: &["__sk_common", "skc_family"],
        slot: |o| &mut o.skc_family,
    },
    Field {
        name: "skc_daddr",
        root: "sock",
        path: &["__sk_common", "skc_daddr"],
        slot: |o| &mut o.skc_daddr,
    },
    Field {
        name: "skc_rcv_saddr",
        root: "sock",
        path: &["__sk_common", "skc_rcv_saddr"],
        slot: |o| &mut o.skc_rcv_saddr,
    },
    Field {
        name: "skc_v6_daddr",
        root: "sock",
        path: &["__sk_common", "skc_v6_daddr"],
        slot: |o| &mut o.skc_v6_daddr,
    },
    Field {
        name: "skc_v6_rcv_saddr",
        root: "sock",
        path: &["__sk_common", "skc_v6_rcv_saddr"],
        slot: |o| &mut o.skc_v6_rcv_saddr,
    },
    Field {
        name: "skc_dport",
        root: "sock",
        path: &["__sk_common", "skc_dport"],
        slot: |o| &mut o.skc_dport,
    },
    Field {
        name: "inet_sport",
        root: "inet_sock",
        path: &["inet_sport"],
        slot: |o| &mut o.inet_sport,
    },
    Field {
        name: "sk_protocol",
        root: "sock",
        path: &["sk_protocol"],
        slot: |o| &mut o.sk_protocol,
    },
];

/// Fields whose absence blanks netns/inode in events, rules out `--cgroup`, or leaves
/// TIME_WAIT births to be confirmed by polling.
const OPTIONAL: [Field; 36] = [
    Field {
        name: "skc_net",
        root: "sock",
        path: &["__sk_common", "skc_net", "net"],
        slot: |o| &mut o.skc_net,
    },
    Field {
        name: "net.ns.inum",
        root: "net",
        path: &["ns", "inum"],
        slot: |o| &mut o.net_ns_inum,
    },
    Field {
        name: "sk_socket",
        root: "sock",
        path: &["sk_socket"],
        slot: |o| &mut o.sk_socket,
    },
    Field {
        name: "socket.file",
        root: "socket",
        path: &["file"],
        slot: |o| &mut o.socket_file,
    },
    Field {
        name: "file.f_inode",
        root: "file",
        path: &["f_inode"],
        slot: |o| &mut o.file_inode,
    },
    Field {
        name: "inode.i_ino",
        root: "inode",
        path: &["i_ino"],
        slot: |o| &mut o.inode_ino,
    },
    Field {
        name: "sk_cgrp_data.cgroup",
        root: "sock",
        path: &["sk_cgrp_data", "cgroup"],
        slot: |o| &mut o.sk_cgroup,
    },
    Field {
        name: "cgroup.kn",
        root: "cgroup",
        path: &["kn"],
        slot: |o| &mut o.cgroup_kn,
    },
    Field {
        name: "kernfs_node.id",
        root: "kernfs_node",
        path: &["id"],
        slot: |o| &mut o.kernfs_id,
    },
    Field {
        name: "sk_err",
        root: "sock",
        path: &["sk_err"],
        slot: |o| &mut o.sk_err,
    },
    Field {
        name: "task_struct.tgid",
        root: "task_struct",
        path: &["tgid"],
        slot: |o| &mut o.task_tgid,
    },
    Field {
        name: "inode.i_mode",
        root: "inode",
        path: &["i_mode"],
        slot: |o| &mut o.inode_mode,
    },
    Field {
        name: "task_struct.flags",
        root: "task_struct",
        path: &["flags"],
        slot: |o| &mut o.task_flags,
    },
    Field {
        name: "tcp_death_row.tw_refcount",
        root: "net",
        path: &["ipv4", "tcp_death_row", "tw_refcount"],
        slot: |o| &mut o.net_tw_refcount,
    },
    Field {
        name: "tcp_death_row.sysctl_max_tw_buckets",
        root: "net",
        path: &["ipv4", "tcp_death_row", "sysctl_max_tw_buckets"],
        slot: |o| &mut o.net_max_tw_buckets,
    },
    Field {
        name: "skc_flags",
        root: "sock",
        path: &["__sk_common", "skc_flags"],
        slot: |o| &mut o.skc_flags,
    },
    Field {
        name: "task_struct.files",
        root: "task_struct",
        path: &["files"],
        slot: |o| &mut o.task_files,
    },
    Field {
        name: "files_struct.fdt",
        root: "files_struct",
        path: &["fdt"],
        slot: |o| &mut o.files_fdt,
    },
    Field {
        name: "fdtable.max_fds",
        root: "fdtable",
        path: &["max_fds"],
        slot: |o| &mut o.fdtable_max_fds,
    },
    Field {
        name: "fdtable.fd",
        root: "fdtable",
        path: &["fd"],
        slot: |o| &mut o.fdtable_fd,
    },
    Field {
        name: "file.private_data",
        root: "file",
        path: &["private_data"],
        slot: |o| &mut o.file_private_data,
    },
    Field {
        name: "socket.sk",
        root: "socket",
        path: &["sk"],
        slot: |o| &mut o.socket_sk,
    },
    Field {
        name: "pt_regs.ip",
        root: "pt_regs",
        path: &["ip"],
        slot: |o| &mut o.pt_regs_ip,
    },
    Field {
        name: "pt_regs.sp",
        root: "pt_regs",
        path: &["sp"],
        slot: |o| &mut o.pt_regs_sp,
    },
    Field {
        name: "pt_regs.bp",
        root: "pt_regs",
        path: &["bp"],
        slot: |o| &mut o.pt_regs_bp,
    },
    Field {
        name: "skc_num",
        root: "sock",
        path: &["__sk_common", "skc_num"],
        slot: |o| &mut o.skc_num,
    },
    Field {
        name: "skc_state",
        root: "sock",
        path: &["__sk_common", "skc_state"],
        slot: |o| &mut o.skc_state,
    },
    Field {
        name: "tcp_sock.rcv_nxt",
        root: "tcp_sock",
        path: &["rcv_nxt"],
        slot: |o| &mut o.tcp_rcv_nxt,
    },
    Field {
        name: "tcp_sock.copied_seq",
        root: "tcp_sock",
        path: &["copied_seq"],
        slot: |o| &mut o.tcp_copied_seq,
    },
    Field {
        name: "tcp_sock.lsndtime",
        root: "tcp_sock",
        path: &["lsndtime"],
        slot: |o| &mut o.tcp_lsndtime,
    },
    Field {
        name: "tcp_sock.rcv_tstamp",
        root: "tcp_sock",
        path: &["rcv_tstamp"],
        slot: |o| &mut o.tcp_rcv_tstamp,
    },
    Field {
        name: "icsk_ack.lrcvtime",
        root: "tcp_sock",
        path: &["inet_conn", "icsk_ack", "lrcvtime"],
        slot: |o| &mut o.icsk_lrcvtime,
    },
    Field {
        name: "tcp_sock.bytes_received",
        root: "tcp_sock",
        path: &["bytes_received"],
        slot: |o| &mut o.tcp_bytes_received,
    },
    Field {
        name: "tw_substate",
        root: "inet_timewait_sock",
        path: &["tw_substate"],
        slot: |o| &mut o.tw_substate,
    },
    Field {
        name: "tw_timer.expires",
        root: "inet_timewait_sock",
        path: &["tw_timer", "expires"],
        slot: |o| &mut o.tw_expires,
    },
    Field {
        name: "socket_alloc.vfs_inode",
        root: "socket_alloc",
        path: &["vfs_inode"],
        slot: |o| &mut o.socket_alloc_inode,
    },
];

impl Resolved {
    /// Whether every one of these optional fields was resolved.
    pub fn has_all(&self, fields: &[&str]) -> bool {
        !fields.iter().any(|f| self.missing_optional.contains(f))
    }
}

pub fn resolve(path: &Path) -> Result<Resolved> {
    let btf = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(path))
        .with_context(|| format!("cannot parse kernel BTF at {}", path.display()))?;
    let Scan {
        roots,
        attach_targets,
    } = scan(&btf)?;
    let mut r = Resolved {
        offsets: Offsets::unresolved(),
        missing_required: Vec::new(),
        missing_optional: Vec::new(),
        attach_targets,
    };
    for (fields, missing) in [
        (&REQUIRED[..], &mut r.missing_required),
        (&OPTIONAL[..], &mut r.missing_optional),
    ] {
        for f in fields {
            let found = match roots.get(f.root) {
                Some(root) => member_offset(&btf, root.clone(), f.root, f.path),
                None => Err(anyhow::anyhow!("no struct {}", f.root)),
            };
            match found {
                Ok(off) => *(f.slot)(&mut r.offsets) = off,
                Err(_) => missing.push(f.name),
            }
        }
    }
    Ok(r)
}

/// What one scan of the BTF's names finds.
struct Scan {
    /// The structs the fields are found from, by name.
    roots: HashMap<String, Type>,
    /// The programs' attach targets, with their ids.
    attach_targets: Vec<attach_btf::Found>,
}

/// The structs the fields are found from and the programs' attach targets, in one scan
/// of the BTF's names (a lookup by name scans every type of the mmapped BTF: one per
/// name cost ~1 ms each).
fn scan(btf: &Btf) -> Result<Scan> {
    let mut names: Vec<&str> = REQUIRED.iter().chain(&OPTIONAL).map(|f| f.root).collect();
    names.extend(attach_btf::TARGETS.iter().map(|&(name, _)| name));
    names.sort_unstable();
    names.dedup();
    let pattern = format!("^(?:{})$", names.join("|"));
    let re = regex::Regex::new(&pattern).context("type names as a pattern")?;
    let mut found = Scan {
        roots: HashMap::new(),
        attach_targets: Vec::new(),
    };
    for id in btf.resolve_ids_by_regex(&re)? {
        let ty = btf.resolve_type_by_id(id)?;
        let (name, kind) = match &ty {
            Type::Struct(s) => {
                found.roots.entry(btf.resolve_name(s)?).or_insert(ty);
                continue;
            }
            Type::Typedef(t) => (btf.resolve_name(t)?, Kind::Typedef),
            Type::Func(f) => (btf.resolve_name(f)?, Kind::Func),
            _ => continue,
        };
        if let Some((name, kind)) = attach_btf::target(&name, kind)
            && !found.attach_targets.iter().any(|&(n, _, _)| n == name)
        {
            found.attach_targets.push((name, kind, id));
        }
    }
    Ok(found)
}

/// Fields the probe reads to tell what a FIN_WAIT2/CLOSING -> CLOSE left behind.
pub const TIMEWAIT_FIELDS: [&str; 4] = [
    "sk_err",
    "skc_flags",
    "tcp_death_row.tw_refcount",
    "tcp_death_row.sysctl_max_tw_buckets",
];

/// Fields the socket-fd iterator reads (without them the fd index walks /proc).
pub const SOCKET_FD_FIELDS: [&str; 4] = [
    "task_struct.tgid",
    "file.f_inode",
    "inode.i_mode",
    "inode.i_ino",
];

/// Of those, the ones nothing else reads.
pub const SOCKET_FD_ONLY_FIELDS: [&str; 2] = ["task_struct.tgid", "inode.i_mode"];

/// The field the probe reads to tell a close by exit from a close() call (present in
/// every BTF kernel; without it an exit counts as a close, as before).
pub const EXIT_FIELDS: [&str; 1] = ["task_struct.flags"];

/// Fields stack capture reads at accept() and at a read that returned EOF, to find the
/// socket behind the syscall's fd (connect() needs none of them).
pub const STACK_FD_FIELDS: [&str; 8] = [
    "task_struct.files",
    "files_struct.fdt",
    "fdtable.max_fds",
    "fdtable.fd",
    "file.private_data",
    "socket.sk",
    "file.f_inode",
    "inode.i_mode",
];

/// User registers copied with a stack, for unwinding its first frames in userspace
/// (without them only the frame-pointer walk is there).
pub const STACK_REG_FIELDS: [&str; 3] = ["pt_regs.ip", "pt_regs.sp", "pt_regs.bp"];

/// Fields the TCP socket iterator reads, beside the tuple and the inode (without them
/// the seed dumps through sock_diag).
pub const TCP_ITER_FIELDS: [&str; 10] = [
    "skc_num",
    "skc_state",
    "tcp_sock.rcv_nxt",
    "tcp_sock.copied_seq",
    "tcp_sock.lsndtime",
    "tcp_sock.rcv_tstamp",
    "icsk_ack.lrcvtime",
    "tcp_sock.bytes_received",
    "tw_substate",
    "tw_timer.expires",
];

/// Fields that lead from a socket to its inode.
pub const INODE_FIELDS: [&str; 4] = ["sk_socket", "socket.file", "file.f_inode", "inode.i_ino"];

/// Fields the probe reads to match `--cgroup` against a socket's cgroup.
pub const CGROUP_FIELDS: [&str; 3] = ["sk_cgrp_data.cgroup", "cgroup.kn", "kernfs_node.id"];

/// `--cgroup` (a non-zero id) is refused where the probe cannot read a socket's cgroup:
/// its id would read 0 and every event would be filtered out, silently.
pub fn check_cgroup_filter(cgroup_id: u64, resolved: Option<&Resolved>) -> Result<()> {
    if cgroup_id == 0 {
        return Ok(());
    }
    let missing: Vec<&str> = match resolved {
        None => vec!["kernel BTF"],
        Some(r) => CGROUP_FIELDS
            .iter()
            .copied()
            .filter(|f| r.missing_optional.contains(f))
            .collect(),
    };
    if !missing.is_empty() {
        bail!(
            "--cgroup cannot be used on this kernel: it lacks {} (cgroup v2 socket data, kernel 5.15 or later with BTF); filter with --pid instead",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Byte offset of `path` (a chain of member names, anonymous structs/unions searched
/// through) inside `struct root`. Bitfields and non-byte-aligned members are refused.
#[cfg(test)]
fn field_offset(btf: &Btf, root: &str, path: &[&str]) -> Result<u32> {
    member_offset(btf, named_struct(btf, root)?, root, path)
}

/// `field_offset` from the root struct's type.
fn member_offset(btf: &Btf, mut ty: Type, root: &str, path: &[&str]) -> Result<u32> {
    let mut total_bits = 0u32;
    for (i, name) in path.iter().enumerate() {
        let (bits, member_ty) = find_member(btf, &ty, name)?.with_context(|| {
            format!(
                "struct {root} has no field {}",
                path.get(..=i).unwrap_or(path).join(".")
            )
        })?;
        total_bits += bits;
        ty = strip(btf, member_ty)?;
    }
    if !total_bits.is_multiple_of(8) {
        bail!("{root}.{} is not byte-aligned", path.join("."));
    }
    Ok(total_bits / 8)
}

#[cfg(test)]
fn named_struct(btf: &Btf, name: &str) -> Result<Type> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("no struct {name} in kernel BTF"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .with_context(|| format!("no struct {name} in kernel BTF"))
}

/// Follows typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type> {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(t) => ty = btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                ty = btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => ty = btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        }
    }
    bail!("type chain too deep")
}

/// Finds `name` among the members of a struct/union, descending into anonymous members.
/// Returns the member's bit offset and its type.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        bail!("{name}: parent is not a struct or union");
    };
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            if m.bitfield_size().is_some_and(|size| size != 0) {
                bail!("{name} is a bitfield");
            }
            return Ok(Some((m.bit_offset(), btf.resolve_chained_type(m)?)));
        }
        if mname.is_empty() {
            let inner = strip(btf, btf.resolve_chained_type(m)?)?;
            if matches!(inner, Type::Struct(_) | Type::Union(_))
                && let Some((bits, found)) = find_member(btf, &inner, name)?
            {
                return Ok(Some((m.bit_offset() + bits, found)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks against the running kernel's BTF when it has one (every supported kernel
    /// does; the test says so and passes vacuously only where there is none).
    #[test]
    fn resolves_sock_fields_on_this_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("no kernel BTF here: skipped");
            return;
        }
        let r = resolve(path).unwrap();
        assert!(check_cgroup_filter(42, Some(&r)).is_ok());
        assert!(r.missing_required.is_empty(), "{:?}", r.missing_required);
        // `__sk_common` is the first member of `struct sock`, `skc_daddr` its first field.
        assert_eq!(r.offsets.skc_daddr, 0);
        assert_eq!(r.offsets.skc_rcv_saddr, 4);
        assert!(r.offsets.inet_sport > r.offsets.sk_protocol);
        let btf = Btf::from_file(path).unwrap();
        assert!(field_offset(&btf, "sock", &["no_such_field"]).is_err());
        assert!(field_offset(&btf, "no_such_struct", &["x"]).is_err());
    }

    #[test]
    fn cgroup_filter_needs_its_offsets() {
        let resolved = |missing: Vec<&'static str>| Resolved {
            attach_targets: Vec::new(),
            offsets: Offsets::unresolved(),
            missing_required: Vec::new(),
            missing_optional: missing,
        };
        // No --cgroup: nothing to check, whatever is missing.
        assert!(check_cgroup_filter(0, None).is_ok());
        assert!(check_cgroup_filter(7, Some(&resolved(vec![]))).is_ok());
        // Unrelated fields missing (netns, inode): --cgroup still works.
        assert!(check_cgroup_filter(7, Some(&resolved(vec!["inode.i_ino"]))).is_ok());
        let err = check_cgroup_filter(7, Some(&resolved(vec!["kernfs_node.id"])))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--cgroup cannot be used") && err.contains("kernfs_node.id"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        let err = check_cgroup_filter(7, None).unwrap_err().to_string();
        assert!(err.contains("kernel BTF"), "{err}");
    }
}
