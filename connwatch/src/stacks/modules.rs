//! The unwind tables of a process's binaries, for framehop: each executable mapping of
//! `/proc/PID/maps` with the `.eh_frame` and `.eh_frame_hdr` of its file, read through
//! `/proc/PID/map_files` (the process's own file, whatever its mount namespace). Tables
//! are kept per file (device, inode), so many processes of one binary parse it once.
use std::{collections::HashMap, ops::Range, sync::Arc};

use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _, x86_64::UnwinderX86_64};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// A file's unwind sections, addresses as in the file (SVMA).
struct Tables {
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    /// Executable segments: (file offset, address) of each.
    exec_segments: Vec<(u64, u64)>,
}

/// Parsed files, by (device, inode).
#[derive(Default)]
pub struct Files {
    tables: HashMap<(u64, u64), Option<Arc<Tables>>>,
}

/// A process's unwinder, and the address ranges it covers.
pub struct ProcessModules {
    pub unwinder: UnwinderX86_64<Arc<[u8]>>,
    ranges: Vec<Range<u64>>,
}

impl ProcessModules {
    pub fn covers(&self, addr: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&addr))
    }
}

impl Files {
    /// The unwinder of `pid`'s executable mappings (empty when its maps cannot be read:
    /// unwinding then falls back to frame pointers).
    pub fn process(&mut self, pid: u32) -> ProcessModules {
        let mut m = ProcessModules {
            unwinder: UnwinderX86_64::new(),
            ranges: Vec::new(),
        };
        let Ok(maps) = procfs::process::Process::new(pid as i32).and_then(|p| p.maps()) else {
            return m;
        };
        for map in maps.iter() {
            let procfs::process::MMapPath::Path(path) = &map.pathname else {
                continue;
            };
            if !map.perms.contains(procfs::process::MMPermissions::EXECUTE) {
                continue;
            }
            let key = (map.dev.0 as u64 * 256 + map.dev.1 as u64, map.inode);
            let file = format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                map.address.0, map.address.1
            );
            let tables = self
                .tables
                .entry(key)
                .or_insert_with(|| read_tables(&file).map(Arc::new))
                .clone();
            let Some(t) = tables else { continue };
            // The segment this mapping maps: its load bias turns file addresses into
            // the process's.
            let Some(&(seg_off, seg_addr)) = t
                .exec_segments
                .iter()
                .filter(|(off, _)| *off <= map.offset)
                .max_by_key(|(off, _)| *off)
            else {
                continue;
            };
            let svma_start = seg_addr + (map.offset - seg_off);
            let bias = map.address.0.wrapping_sub(svma_start);
            let info = ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: t.text.clone(),
                got_svma: t.got.clone(),
                eh_frame_svma: t.eh_frame.as_ref().map(|(r, _)| r.clone()),
                eh_frame: t.eh_frame.as_ref().map(|(_, d)| Arc::clone(d)),
                eh_frame_hdr_svma: t.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
                eh_frame_hdr: t.eh_frame_hdr.as_ref().map(|(_, d)| Arc::clone(d)),
                ..Default::default()
            };
            let range = map.address.0..map.address.1;
            m.unwinder.add_module(Module::new(
                path.display().to_string(),
                range.clone(),
                bias,
                info,
            ));
            m.ranges.push(range);
        }
        m
    }
}

/// Mappings start at page boundaries: segments are compared page-aligned.
const PAGE: u64 = 0xfff;

fn read_tables(file: &str) -> Option<Tables> {
    let data = std::fs::read(file).ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let section = |name: &str| -> Option<(Range<u64>, Arc<[u8]>)> {
        let s = elf.section_by_name(name)?;
        let bytes = s.data().ok()?;
        Some((s.address()..s.address() + s.size(), Arc::from(bytes)))
    };
    let range = |name: &str| {
        elf.section_by_name(name)
            .map(|s| s.address()..s.address() + s.size())
    };
    let exec_segments = elf
        .segments()
        .filter(|s| {
            matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0)
        })
        .map(|s| (s.file_range().0 & !PAGE, s.address() & !PAGE))
        .collect();
    Some(Tables {
        eh_frame: section(".eh_frame"),
        eh_frame_hdr: section(".eh_frame_hdr"),
        text: range(".text"),
        got: range(".got"),
        exec_segments,
    })
}
