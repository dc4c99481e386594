//! What a symbolized stack says: its frames as an engineer reads them, where the
//! program's own code begins, and whether the stack is whole (and if not, what would
//! make it so).
use serde::Serialize;

use super::record::At;

/// One symbolized frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    pub addr: u64,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The binary the address is in.
    pub module: Option<String>,
}

impl Frame {
    /// `function (file:line)`, `function`, or the address in its binary.
    pub fn label(&self) -> String {
        match (&self.function, &self.file) {
            (Some(f), Some(file)) => {
                let file = file.rsplit('/').next().unwrap_or(file);
                match self.line {
                    Some(l) => format!("{f} ({file}:{l})"),
                    None => format!("{f} ({file})"),
                }
            }
            (Some(f), None) => f.clone(),
            (None, _) => match &self.module {
                Some(m) => format!("{:#x} ({})", self.addr, m.rsplit('/').next().unwrap_or(m)),
                None => format!("{:#x}", self.addr),
            },
        }
    }
}

/// A distinct stack of one process at one capture point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Site {
    pub at: At,
    /// Innermost first.
    pub stack: Vec<String>,
    pub truncated: bool,
    /// What would give a whole stack, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'static str>,
    /// Index in `stack` of the first frame of the program's own code (not a library,
    /// a runtime or the language's standard library), if any frame is.
    #[serde(skip)]
    pub own: Option<usize>,
}

impl Site {
    /// The site in a line: its own code's innermost frame and that frame's caller.
    /// Without a frame of the program's own, it says so rather than name a library's
    /// or an interpreter's function as the place.
    pub fn summary(&self) -> String {
        let verb = if self.at.made() {
            "made at"
        } else {
            "read EOF at"
        };
        let mut s = match self.own {
            Some(own) => {
                let frames: Vec<&str> = self
                    .stack
                    .iter()
                    .skip(own)
                    .take(2)
                    .map(String::as_str)
                    .collect();
                format!("{verb} {}", frames.join(" ← "))
            }
            None => format!("{verb} no function of the program's own"),
        };
        if self.truncated {
            s += " (stack incomplete";
            if let Some(h) = self.hint {
                s += ": ";
                s += h;
            }
            s += ")";
        }
        s
    }
}

/// Functions a whole stack ends in: a thread's or a program's first frame.
const ROOTS: [&str; 10] = [
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone3",
    "runtime.goexit",
    "runtime.main",
    "main",
];

/// Interpreters whose programs' functions are named only through a perf map, with the
/// option that writes one.
const INTERPRETERS: [(&str, &str); 8] = [
    (
        "python",
        "run python 3.12+ with -X perf so that its functions are named",
    ),
    (
        "node",
        "start node with --perf-basic-prof --interpreted-frames-native-stack",
    ),
    (
        "java",
        "run the JVM with -XX:+PreserveFramePointer and a perf map agent",
    ),
    ("ruby", RUNTIME_WITHOUT_MAP),
    ("perl", RUNTIME_WITHOUT_MAP),
    ("php", RUNTIME_WITHOUT_MAP),
    ("beam.smp", RUNTIME_WITHOUT_MAP),
    ("lua", RUNTIME_WITHOUT_MAP),
];

const RUNTIME_WITHOUT_MAP: &str =
    "an interpreter without a perf map: only its own functions can be named";

/// Perf-map names of a runtime's or its libraries' code rather than the program's:
/// Node's built-ins and internal modules, V8's stubs, Python's standard library and
/// installed packages.
const RUNTIME_CODE: [&str; 8] = [
    "node:",
    "Builtin:",
    "BytecodeHandler:",
    "Stub:",
    "/usr/lib/python",
    "site-packages/",
    "dist-packages/",
    "<frozen ",
];

const NO_FRAME_POINTERS: &str = "build with -fno-omit-frame-pointer, or keep .eh_frame";
const LATER_TICK: &str = "the runtime made it on a later tick (a pool or an event loop): the code that asked for it is not on this stack";

/// The site of `frames` captured at `at` in a process running `exe`.
pub fn site(at: At, frames: &[Frame], exe: &str) -> Site {
    let exe_name = exe.rsplit('/').next().unwrap_or(exe);
    let interpreter = INTERPRETERS
        .iter()
        .find(|(name, _)| exe_name.starts_with(name))
        .map(|(_, hint)| *hint);
    let go = frames.iter().any(|f| {
        f.function
            .as_deref()
            .is_some_and(|n| n.starts_with("runtime."))
    });
    let own = frames
        .iter()
        .position(|f| is_own(f, exe, go, interpreter.is_some()));
    let whole = frames
        .last()
        .and_then(|f| f.function.as_deref())
        .is_some_and(|n| ROOTS.contains(&n));
    let named = frames.iter().all(|f| f.function.is_some());
    let mapped = frames.iter().any(from_perf_map);
    let (truncated, hint) = match own {
        None if interpreter.is_some() && mapped => (true, Some(LATER_TICK)),
        None if interpreter.is_some() => (true, interpreter),
        None if go && whole => (true, Some(LATER_TICK)),
        None => (true, Some(NO_FRAME_POINTERS)),
        Some(_) if !whole || !named => (true, Some(NO_FRAME_POINTERS)),
        Some(_) => (false, None),
    };
    Site {
        at,
        stack: frames.iter().map(Frame::label).collect(),
        truncated,
        hint,
        own,
    }
}

/// Whether a frame was named by a perf map (JIT or interpreted code, in no file).
fn from_perf_map(f: &Frame) -> bool {
    f.function.is_some() && f.module.as_deref().is_none_or(|m| m.contains("perf-"))
}

/// Whether a frame is the program's own code: in its executable (or, for an
/// interpreter, named by its perf map), and neither a root nor the Go runtime or
/// standard library.
fn is_own(f: &Frame, exe: &str, go: bool, interpreted: bool) -> bool {
    let Some(name) = f.function.as_deref() else {
        return false;
    };
    if ROOTS.contains(&name) && name != "main" {
        return false;
    }
    if interpreted {
        // Functions of the interpreter itself live in its executable or libraries; the
        // program's own come from the perf map, beside those of the runtime's modules.
        return from_perf_map(f) && !RUNTIME_CODE.iter().any(|r| name.contains(r));
    }
    if f.module.as_deref() != Some(exe) {
        return false;
    }
    if go {
        // Standard packages have no dot in their first path element ("net", "syscall",
        // "internal/poll"); the program's are "main" or a module path.
        let package = name.split('(').next().unwrap_or(name);
        let first = package.split('/').next().unwrap_or(package);
        return name.starts_with("main.") || (first.contains('.') && package.contains('/'));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str, file: Option<(&str, u32)>) -> Frame {
        Frame {
            addr: 0x1234,
            function: (!function.is_empty()).then(|| function.to_string()),
            file: file.map(|(f, _)| f.to_string()),
            line: file.map(|(_, l)| l),
            module: Some(module.to_string()),
        }
    }

    const EXE: &str = "/srv/app/server";
    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    #[test]
    fn a_c_stack_names_the_handler_under_the_libc_wrapper() {
        let frames = [
            frame("__libc_read", LIBC, None),
            frame("leaky_handler", EXE, Some(("/src/server.c", 17))),
            frame("main", EXE, Some(("/src/server.c", 40))),
            frame("__libc_start_call_main", LIBC, None),
        ];
        let s = site(At::Eof, &frames, EXE);
        assert!(!s.truncated);
        assert_eq!(s.own, Some(1));
        assert_eq!(
            s.summary(),
            "read EOF at leaky_handler (server.c:17) ← main (server.c:40)"
        );
    }

    #[test]
    fn a_stack_that_stops_early_is_truncated_with_the_fix() {
        let frames = [
            frame("__libc_read", LIBC, None),
            frame("leaky_handler", EXE, None),
            frame("", EXE, None),
        ];
        let s = site(At::Eof, &frames, EXE);
        assert!(s.truncated);
        assert_eq!(s.hint, Some(NO_FRAME_POINTERS));
        assert!(s.summary().contains("stack incomplete"), "{}", s.summary());
        assert!(s.stack[2].starts_with("0x1234 (server)"), "{:?}", s.stack);
    }

    #[test]
    fn go_skips_the_standard_library_and_tells_a_later_tick() {
        let go = "/usr/local/bin/client";
        let frames = [
            frame("syscall.connect", go, None),
            frame("net.(*sysDialer).dialSerial", go, None),
            frame("main.leakyClient", go, Some(("/src/client.go", 12))),
            frame("main.main", go, None),
            frame("runtime.main", go, None),
            frame("runtime.goexit", go, None),
        ];
        let s = site(At::Connect, &frames, go);
        assert_eq!((s.own, s.truncated), (Some(2), false));
        assert!(
            s.summary()
                .starts_with("made at main.leakyClient (client.go:12) ← main.main")
        );
        // A dial of net/http's Transport: no frame of the program's own.
        let pooled = [
            frame("syscall.connect", go, None),
            frame("net/http.(*Transport).dialConn", go, None),
            frame("runtime.goexit", go, None),
        ];
        let s = site(At::Connect, &pooled, go);
        assert!(s.truncated);
        assert_eq!(s.hint, Some(LATER_TICK));
        // A module path is the program's own code.
        assert!(is_own(
            &frame("github.com/acme/db.(*Pool).Get", go, None),
            go,
            true,
            false
        ));
    }

    #[test]
    fn an_interpreter_without_a_perf_map_is_truncated_with_its_option() {
        let py = "/usr/bin/python3.11";
        let frames = [
            frame("__libc_recv", LIBC, None),
            frame("sock_recv_guts", py, None),
            frame("_PyEval_EvalFrameDefault", py, None),
            frame("main", py, None),
        ];
        let s = site(At::Eof, &frames, py);
        assert!(s.truncated);
        assert!(s.hint.unwrap().contains("-X perf"));
        // The interpreter's own C functions are not named as the place.
        assert_eq!(
            s.summary(),
            "read EOF at no function of the program's own (stack incomplete: run python 3.12+ with -X perf so that its functions are named)"
        );
        // With `-X perf`: the program's function is named, the standard library's and
        // the installed packages' are passed over.
        let map = "/tmp/perf-4242.map";
        let frames = [
            frame("__libc_recv", LIBC, None),
            frame("py::recv_into:/usr/lib/python3.12/socket.py", map, None),
            frame(
                "py::get:/usr/lib/python3/dist-packages/requests/api.py",
                map,
                None,
            ),
            frame("py::fetch_prices:/srv/app/client.py", map, None),
            frame("_PyEval_EvalFrameDefault", py, None),
            frame("main", py, None),
        ];
        let s = site(At::Eof, &frames, py);
        assert_eq!((s.own, s.truncated), (Some(3), false), "{s:?}");
        // A connect made by Node's event loop on a later tick: only its internals.
        let node = "/usr/bin/node";
        let frames = [
            frame("__connect", LIBC, None),
            frame("LazyCompile:*internalConnect node:net:1063", map, None),
            frame(
                "LazyCompile:~processTicksAndRejections node:internal/process/task_queues:67",
                map,
                None,
            ),
            frame("main", node, None),
        ];
        let s = site(At::Connect, &frames, node);
        assert_eq!((s.truncated, s.hint), (true, Some(LATER_TICK)));
    }
}
