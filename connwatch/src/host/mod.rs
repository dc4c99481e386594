//! What the host tells connwatch, read-only: sockets through netlink sock_diag (per
//! network namespace), who holds them (/proc or the probe's socket-fd iterator), the
//! namespaces themselves, and the kernel's TCP settings.
pub mod cgroup;
pub mod container;
pub mod kernelinfo;
pub mod netns;
pub mod owners;
pub mod runtime;
pub mod sockdiag;
