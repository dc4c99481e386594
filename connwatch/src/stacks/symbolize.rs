//! Addresses of a live process to functions, files and lines, with blazesym: ELF
//! symbols, DWARF where present, Go's symbol tables, and perf maps (`/tmp/perf-PID.map`)
//! for JIT-compiled code. Its binaries are read through `/proc/PID/map_files`, so a
//! process in a container is symbolized from its own files; blazesym keeps each file's
//! parsed symbols, so a binary is parsed once for all its processes.
use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Process, Source},
};

use super::site::Frame;

pub struct Symbols {
    symbolizer: Symbolizer,
}

impl Default for Symbols {
    fn default() -> Self {
        Self {
            symbolizer: Symbolizer::new(),
        }
    }
}

impl Symbols {
    /// The frames of `addrs` (the instruction pointer, then return addresses) in `pid`.
    /// A return address is looked up one byte back, inside the call that it follows
    /// (the next line may belong to another function or line).
    pub fn frames(&self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let lookup: Vec<u64> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
            .collect();
        let src = Source::Process(Process::new(pid.into()));
        let syms = self
            .symbolizer
            .symbolize(&src, Input::AbsAddr(&lookup))
            .unwrap_or_default();
        let mut frames = Vec::with_capacity(addrs.len());
        for (i, &addr) in addrs.iter().enumerate() {
            let mut f = Frame {
                addr,
                ..Frame::default()
            };
            if let Some(Symbolized::Sym(sym)) = syms.get(i) {
                f.module = sym
                    .module
                    .as_ref()
                    .map(|m| m.to_string_lossy().into_owned());
                // Functions inlined at this address come first, innermost first.
                for inlined in sym.inlined.iter().rev() {
                    let mut g = Frame {
                        addr,
                        function: Some(inlined.name.to_string()),
                        module: f.module.clone(),
                        ..Frame::default()
                    };
                    if let Some(ci) = &inlined.code_info {
                        g.file = Some(ci.to_path().display().to_string());
                        g.line = ci.line;
                    }
                    frames.push(g);
                }
                f.function = Some(sym.name.to_string());
                if let Some(ci) = &sym.code_info {
                    f.file = Some(ci.to_path().display().to_string());
                    f.line = ci.line;
                }
            }
            frames.push(f);
        }
        frames
    }
}
