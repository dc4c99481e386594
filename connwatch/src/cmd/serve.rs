//! `connwatch serve`: the `watch` report as Prometheus metrics over HTTP.
//!
//! The event loop refreshes the report every `--interval` and renders the scrape text
//! once; HTTP handlers only hand out that text, so a scrape costs no socket or /proc work.
use std::{
    convert::Infallible,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    cli::ServeArgs,
    clock::monotonic_ns,
    cmd::live::Live,
    cmd::shutdown::Shutdown,
    cmd::watch::config,
    filter::Filter,
    probe::ProbeOptions,
    views::metrics::{self, Persistent, Totals},
};

/// Binds `--listen` (a name is resolved; the first address that binds wins), with an
/// error that names what the OS said.
async fn bind(listen: &str) -> Result<TcpListener> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("cannot resolve --listen {listen}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}: {e}: is another connwatch (or something else) using it? pick another with --listen"
        ),
        Some((addr, e)) if e.kind() == std::io::ErrorKind::AddrNotAvailable => anyhow::anyhow!(
            "cannot listen on {addr}: {e}: that address is not on this host; use one of its addresses, 127.0.0.1 or 0.0.0.0"
        ),
        Some((addr, e)) => anyhow::anyhow!("cannot listen on {addr}: {e}"),
        None => anyhow::anyhow!("--listen {listen} resolves to no address"),
    })
}

/// What the HTTP side reads.
struct Shared {
    metrics: Mutex<String>,
    /// CLOCK_MONOTONIC ns of the last refresh: /healthz fails when it is stale.
    last_refresh_ns: AtomicU64,
    stale_after_ns: u64,
}

pub async fn serve(args: ServeArgs, opts: ProbeOptions, filter: Filter) -> Result<ExitCode> {
    let listener = bind(&args.listen).await?;
    let cfg = config(&args.thresholds, args.by);
    // Handlers first: a signal right after "attached" must not kill the process.
    let mut shutdown = Shutdown::new(None)?;
    let mut live = Live::start(&opts, cfg, filter, args.interval, args.tw_poll).await?;
    eprintln!(
        "connwatch: serving http://{}/metrics and /healthz",
        listener.local_addr()?
    );

    let shared = Arc::new(Shared {
        metrics: Mutex::new(String::new()),
        last_refresh_ns: AtomicU64::new(0),
        stale_after_ns: (args.interval * 3 + Duration::from_secs(1)).as_nanos() as u64,
    });
    let mut state = State {
        persistent: Persistent::default(),
        shared: Arc::clone(&shared),
        top: usize::from(args.top),
        cgroup_label: args.cgroup_label,
    };
    state.refresh(&mut live)?;
    loop {
        tokio::select! {
            due = live.report_due() => {
                due?;
                state.refresh(&mut live)?;
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, Arc::clone(&shared)));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = shutdown.wait() => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The event loop's side: counters that persist, and where scrapes read from.
struct State {
    persistent: Persistent,
    shared: Arc<Shared>,
    top: usize,
    cgroup_label: bool,
}

impl State {
    /// Refreshes the report and renders the scrape text.
    fn refresh(&mut self, live: &mut Live) -> Result<()> {
        let report = live.report(false)?;
        let (cw, tw) = live.monitor.take_lifetimes();
        self.persistent.update(
            &Totals {
                events: live.events_seen()?,
                dropped: report.loss.events_dropped,
                untracked: report.loss.sockets_untracked,
                stacks_dropped: report.loss.stacks_dropped,
                poll_ns: live.monitor.poll_ns,
            },
            &cw,
            &tw,
        );
        let text = metrics::render(&report, &self.persistent, self.top, self.cgroup_label);
        if let Ok(mut m) = self.shared.metrics.lock() {
            *m = text;
        }
        self.shared
            .last_refresh_ns
            .store(monotonic_ns(), Ordering::Relaxed);
        Ok(())
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(resp)
    };
    match req.uri().path() {
        "/metrics" => {
            let text = shared.metrics.lock().map(|m| m.clone()).unwrap_or_default();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            let age = monotonic_ns().saturating_sub(shared.last_refresh_ns.load(Ordering::Relaxed));
            if age < shared.stale_after_ns {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "stale: the report has not been refreshed\n".into(),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "connwatch serves /metrics and /healthz\n".into(),
        ),
    }
}
