//! tracefs for the classic-tracepoint fallback. aya reads a tracepoint's id from tracefs,
//! and a fresh machine boots with it unmounted: mount it when needed, and unmount what we
//! mounted once the tracepoint is attached.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};
use connwatch_common::tp_record;

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// A tracefs mount that holds the event; unmounts on drop if connwatch mounted it.
pub struct Mount {
    /// The event's directory (`.../events/<category>/<name>`).
    pub path: PathBuf,
    mounted_by_us: bool,
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted_by_us {
            let target = CString::new(TRACEFS).unwrap_or_default();
            // SAFETY: plain syscall on a NUL-terminated path; lazy so nothing blocks.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

pub fn ensure_event(category: &str, name: &str) -> Result<Mount> {
    let rel = format!("events/{category}/{name}");
    for base in [TRACEFS, DEBUGFS_TRACING] {
        let p = Path::new(base).join(&rel);
        if p.exists() {
            return Ok(Mount {
                path: p,
                mounted_by_us: false,
            });
        }
    }
    let tracefs_empty = std::fs::read_dir(TRACEFS).map(|mut d| d.next().is_none());
    if let Ok(true) = tracefs_empty {
        mount_tracefs()?;
        let p = Path::new(TRACEFS).join(&rel);
        if p.exists() {
            return Ok(Mount {
                path: p,
                mounted_by_us: true,
            });
        }
        drop(Mount {
            path: p,
            mounted_by_us: true,
        });
    } else if tracefs_empty.is_err() {
        bail!(
            "tracefs is not available at {TRACEFS}: mount it with `mount -t tracefs tracefs {TRACEFS}`"
        );
    }
    bail!("the kernel has no tracepoint {category}:{name} (Linux 4.16 or newer is needed)")
}

fn mount_tracefs() -> Result<()> {
    let src = CString::new("tracefs")?;
    let target = CString::new(TRACEFS)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({err}): run `mount -t tracefs tracefs {TRACEFS}`"
        );
    }
    Ok(())
}

/// Checks the tracepoint's record layout against the offsets the probe reads.
pub fn check_record_layout(event_dir: &Path) -> Result<()> {
    let format = std::fs::read_to_string(event_dir.join("format"))?;
    let mismatches = layout_mismatches(&format);
    if !mismatches.is_empty() {
        bail!(
            "the sock:inet_sock_set_state record on this kernel differs from the one connwatch reads ({}): use --hook tp-btf",
            mismatches.join(", ")
        );
    }
    Ok(())
}

/// Fields whose offset in `format` differs from `tp_record` (or which are missing).
pub fn layout_mismatches(format: &str) -> Vec<String> {
    tp_record::FIELDS
        .iter()
        .filter_map(|&(name, want)| match field_offset(format, name) {
            Some(got) if got == want => None,
            Some(got) => Some(format!("{name} at {got}, expected {want}")),
            None => Some(format!("{name} missing")),
        })
        .collect()
}

/// Offset of a field in a tracepoint `format` file, e.g.
/// `field:__u16 sport; offset:24; size:2; signed:0;`.
fn field_offset(format: &str, name: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let field = decl.split_whitespace().last()?;
        let field = field.split('[').next()?;
        if field != name {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.trim().strip_prefix("offset:"))
            .and_then(|v| v.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
ID: 1455
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn known_layout_matches() {
        assert_eq!(layout_mismatches(FORMAT), Vec::<String>::new());
        assert_eq!(field_offset(FORMAT, "saddr_v6"), Some(40));
    }

    #[test]
    fn moved_or_missing_fields_are_reported() {
        let moved = FORMAT.replace("offset:24;", "offset:26;");
        assert_eq!(layout_mismatches(&moved), ["sport at 26, expected 24"]);
        let missing = FORMAT.replace("protocol", "proto");
        assert_eq!(layout_mismatches(&missing), ["protocol missing"]);
    }
}
