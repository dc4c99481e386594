//! `connwatch top` in a real terminal (tmux): it shows a leak, and `q` quits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

common::peer_entry!();

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (installed by cargo xtask setup)")
}

#[test]
fn top_shows_the_leak_and_quits_on_q() {
    require_root();
    let mut leaker = Peer::spawn(&["leaker", "127.0.0.1:0", "2"]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let clients = connect_n(&addr("127.0.0.1", port), 2);
    leaker.expect("accepted");
    drop(clients);

    /// The tmux session, killed with the test (a failed assertion included), so that
    /// no connwatch is left running.
    struct Session(String);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = tmux(&["kill-session", "-t", &self.0]);
        }
    }
    let guard = Session(format!("cwtop{}", std::process::id()));
    let session = guard.0.clone();
    let cmd = format!("{CONNWATCH} top --interval 300ms --close-wait-age 1s");
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pid = leaker.pid().to_string();
    let end = Instant::now() + DEADLINE;
    let screen = loop {
        let shot = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout)
            .into_owned();
        let leak_row = shot
            .lines()
            .any(|l| l.trim_start().starts_with(&pid) && l.contains("close_wait_leak"));
        if leak_row {
            break shot;
        }
        if Instant::now() > end {
            panic!("no leak row for pid {pid} on screen:\n{shot}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        screen.contains("PID") && screen.contains("CLOSE_WAIT"),
        "{screen}"
    );
    assert!(
        screen.contains(&format!("[{pid}] holds 2 CLOSE_WAIT sockets")),
        "{screen}"
    );

    tmux(&["send-keys", "-t", &session, "q"]);
    let end = Instant::now() + DEADLINE;
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(Instant::now() < end, "top did not quit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
}
