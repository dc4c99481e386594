//! Root integration tests of `connwatch serve`: the live /metrics passes promtool, a real
//! Prometheus server scrapes it and sees a CLOSE_WAIT leak's series with the right comm,
//! and the alert rules are valid and pass their unit tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use std::{
    io::Write,
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

common::peer_entry!();

fn tool(name: &str) -> String {
    common::tool(&format!("/usr/bin/{name}"), "prometheus")
}

/// A leaker with `n` CLOSE_WAIT sockets; returns it and its comm.
fn leaker(n: usize) -> (Peer, String) {
    let mut leaker = Peer::spawn(&["leaker", "127.0.0.1:0", &n.to_string()]);
    let port: u16 = leaker.expect("port").parse().unwrap();
    let clients = connect_n(&addr("127.0.0.1", port), n);
    leaker.expect("accepted");
    drop(clients);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", leaker.pid()))
        .unwrap()
        .trim()
        .to_string();
    (leaker, comm)
}

fn serve(port: u16, extra: &[&str]) -> Connwatch {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--interval",
        "300ms",
        "--close-wait-age",
        "1s",
    ];
    args.extend_from_slice(extra);
    Connwatch::start(&args)
}

#[test]
fn metrics_pass_promtool_and_show_the_leak() {
    require_root();
    let promtool = tool("promtool");
    let (leaker, comm) = leaker(3);
    let port = free_port();
    // Only this leaker: other tests' peers run under the same comm.
    let _cw = serve(port, &["--pid", &leaker.pid().to_string()]);
    assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(port, "/nope").0, 404);
    // Series per command by default: no `pid` label, so restarts mint no new series.
    let series = format!(r#"connwatch_close_wait_sockets{{comm="{comm}"}} 3"#);
    let flagged = format!(r#"connwatch_flagged{{comm="{comm}",flag="close_wait_leak"}} 1"#);
    let end = Instant::now() + DEADLINE;
    let body = loop {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, 200);
        if body.contains(&series) && body.contains(&flagged) {
            break body;
        }
        assert!(Instant::now() < end, "no leak series in:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for family in [
        "connwatch_sockets{state=\"CLOSE_WAIT\"}",
        "connwatch_close_wait_oldest_seconds{",
        "connwatch_events_total ",
        "connwatch_events_dropped_total ",
        "connwatch_sockets_untracked_total ",
        "connwatch_poll_seconds_total ",
        "connwatch_close_wait_lifetime_seconds_bucket{",
        "connwatch_time_wait_lifetime_seconds_count ",
        "connwatch_table_entries{table=\"close_wait\"} ",
        "connwatch_resident_memory_bytes ",
    ] {
        assert!(body.contains(family), "{family} missing");
    }
    assert!(
        !body.contains("pid=\""),
        "a pid label without --by process:\n{body}"
    );
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid() {
    let promtool = tool("promtool");
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/alerts.yml");
    let out = Command::new(promtool)
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));
}

/// The alert rules' own unit tests (deploy/alerts_test.yml): one alert per leaking pod,
/// named by namespace, pod and container; a host process named by its command.
#[test]
fn alert_rules_pass_their_unit_tests() {
    let promtool = tool("promtool");
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/alerts_test.yml");
    let out = Command::new(promtool)
        .args(["test", "rules", tests])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Prometheus scrapes connwatch on loopback and can query the leak.
#[test]
fn prometheus_scrapes_the_leak() {
    require_root();
    let prometheus = tool("prometheus");
    let (leaker, comm) = leaker(2);
    let port = free_port();
    let _cw = serve(port, &["--by", "process"]);
    let dir = std::env::temp_dir().join(format!("cw-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: connwatch\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let mut prom = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let query = format!(
        "/api/v1/query?query=connwatch_close_wait_sockets%7Bpid%3D%22{}%22%7D",
        leaker.pid()
    );
    let end = Instant::now() + Duration::from_secs(40);
    let result = loop {
        let answer = TcpStream::connect(("127.0.0.1", web))
            .ok()
            .map(|_| get(web, &query));
        if let Some((200, body)) = answer
            && let Ok(v) = serde_json::from_str::<Value>(&body)
            && let Some(first) = v["data"]["result"].as_array().and_then(|r| r.first())
        {
            break first.clone();
        }
        assert!(Instant::now() < end, "prometheus never returned the series");
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(result["metric"]["comm"], comm.as_str(), "{result}");
    assert_eq!(result["metric"]["job"], "connwatch");
    assert_eq!(result["value"][1], "2", "{result}");
}
