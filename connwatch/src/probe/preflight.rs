//! Checks made before anything is loaded, so that a missing privilege is one sentence
//! rather than an EPERM from deep inside the loader.
use anyhow::{Result, bail};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
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
    bail!("needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF probe: run it with sudo")
}

/// Oldest kernel the probe works on: the BPF ring buffer arrived in 5.8 (tp_btf in 5.5,
/// the tracepoint in 4.16).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// Refuses kernels older than `MIN_KERNEL` with one sentence, instead of the verifier or
/// map-creation error they would give later.
pub fn check_kernel() -> Result<()> {
    check_release(&kernel_release())
}

pub fn check_release(release: &str) -> Result<()> {
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => bail!(
            "connwatch needs Linux {}.{} or later (BPF ring buffer); this kernel is {release}: \
             upgrade the kernel or use `connwatch snapshot`, which needs no BPF",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
        // An unparsable release (a custom build) is let through: the load will tell.
        None => Ok(()),
    }
}

/// `uname -r`, as the kernel reports it to this process (personalities included).
fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Major and minor of a release such as `6.1.0-27-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What connwatch can see beyond its own probe, from the capabilities it holds. A missing
/// one turns off one feature, with a warning; it never stops the tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abilities {
    /// Reading /proc/PID/fd of other users' processes names socket holders: needs
    /// CAP_SYS_PTRACE (ptrace access check) and CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE
    /// (the directory is mode 0500, owned by the process's user).
    pub other_fds: bool,
    /// Entering other network namespaces (setns) to list their sockets: CAP_SYS_ADMIN.
    pub other_netns: bool,
}

impl Abilities {
    pub fn current() -> Self {
        // Unreadable status: assume everything rather than warn about nothing.
        Self::from_caps(effective_caps().unwrap_or(u64::MAX))
    }

    pub fn from_caps(caps: u64) -> Self {
        let has = |cap: u32| caps & (1u64 << cap) != 0;
        Self {
            other_fds: has(CAP_SYS_PTRACE) && (has(CAP_DAC_READ_SEARCH) || has(CAP_DAC_OVERRIDE)),
            other_netns: has(CAP_SYS_ADMIN),
        }
    }

    /// One sentence per feature lost.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.other_fds {
            out.push(
                "warning: without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH other processes' file \
                 descriptors cannot be read, so their CLOSE_WAIT sockets show as unattributed: \
                 run as root for owners",
            );
        }
        if !self.other_netns {
            out.push(
                "warning: without CAP_SYS_ADMIN other network namespaces (containers) cannot be \
                 entered, so only this namespace's existing sockets are listed: run as root to \
                 cover them",
            );
        }
        out
    }
}

/// Prints the warnings of `Abilities::current()` on stderr.
pub fn warn_missing_optional() {
    for w in Abilities::current().warnings() {
        eprintln!("connwatch: {w}");
    }
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
    fn kernel_releases() {
        assert_eq!(parse_release("6.1.0-27-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.8.0"), Some((5, 8)));
        assert_eq!(parse_release("2.6.78"), Some((2, 6)));
        assert_eq!(parse_release("6.18+deb13"), Some((6, 18)));
        assert_eq!(parse_release("custom"), None);
        assert_eq!(parse_release("6.18-rc1"), Some((6, 18)));
        assert!(check_release("5.8.0").is_ok());
        assert!(check_release("6.18.1").is_ok());
        let err = check_release("5.4.0-150-generic").unwrap_err().to_string();
        assert!(
            err.contains("5.8 or later") && err.contains("5.4.0-150-generic"),
            "{err}"
        );
        assert!(check_release("4.19.0").is_err());
        assert!(check_release("custom").is_ok());
    }

    #[test]
    fn optional_abilities() {
        let all = Abilities::from_caps(u64::MAX);
        assert!(all.other_fds && all.other_netns);
        assert!(all.warnings().is_empty());
        let no_ptrace = Abilities::from_caps(!(1 << CAP_SYS_PTRACE));
        assert!(!no_ptrace.other_fds && no_ptrace.other_netns);
        assert_eq!(no_ptrace.warnings().len(), 1);
        assert!(no_ptrace.warnings()[0].contains("CAP_SYS_PTRACE"));
        let dac_override_only = (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_OVERRIDE);
        assert!(Abilities::from_caps(dac_override_only).other_fds);
        let none = Abilities::from_caps(0);
        assert_eq!(none.warnings().len(), 2);
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
