//! Checks made before anything is loaded, so that a missing privilege is one sentence
//! rather than an EPERM from deep inside the loader.
use anyhow::{Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Loading and attaching the probe needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN, which
/// implies both on older kernels).
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps().unwrap_or(0);
    if has_bpf_privileges(caps) {
        return Ok(());
    }
    bail!(
        "connwatch needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF probe: run it with sudo"
    )
}

pub fn has_bpf_privileges(caps: u64) -> bool {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The effective capability set of this process (`CapEff` in /proc/self/status).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Capabilities kept once the probe is attached: reading other processes' fds
/// (SYS_PTRACE, DAC_READ_SEARCH), sock_diag details (NET_ADMIN), and entering other
/// network namespaces and unmounting a tracefs mounted for the fallback (SYS_ADMIN).
/// Everything else, CAP_BPF and CAP_PERFMON included, is dropped: the programs and maps
/// are already open.
pub const KEPT_AFTER_ATTACH: [caps::Capability; 4] = [
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_SYS_ADMIN,
];

/// Drops every capability but `KEPT_AFTER_ATTACH` from the effective, permitted and
/// inheritable sets. Best effort: failing to drop is logged, not fatal.
pub fn drop_capabilities() {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = KEPT_AFTER_ATTACH.into_iter().collect();
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        let current = caps::read(None, set).unwrap_or_default();
        let wanted: CapsHashSet = current.intersection(&keep).copied().collect();
        if let Err(e) = caps::set(None, set, &wanted) {
            log::warn!("could not drop capabilities ({set:?}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn privilege_rules() {
        assert!(has_bpf_privileges(0x1ff_ffff_ffff));
        assert!(has_bpf_privileges(1 << CAP_SYS_ADMIN));
        assert!(has_bpf_privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_bpf_privileges(1 << CAP_BPF));
        assert!(!has_bpf_privileges(0));
    }
}
