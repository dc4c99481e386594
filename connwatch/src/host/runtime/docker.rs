//! The Docker Engine API (`GET /containers/json` over its unix socket): each running
//! container's name and labels (compose's, and the CRI's where cri-dockerd made it).
use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::Names;
use crate::host::container::Runtime;

#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
}

/// Every running container, by id, with its names.
pub(super) async fn list(socket: &Path) -> Result<HashMap<String, Names>> {
    if !socket.exists() {
        bail!("no socket there");
    }
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .context("cannot connect")?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get("/containers/json")
        .header("host", "docker")
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("GET /containers/json")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    if !status.is_success() {
        bail!(
            "GET /containers/json answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let listed: Vec<Listed> =
        serde_json::from_slice(&body).context("GET /containers/json: not a container list")?;
    Ok(listed
        .into_iter()
        .map(|c| {
            // Docker names start with `/` (`/shop-web-1`).
            let name = c
                .names
                .first()
                .map(|n| n.trim_start_matches('/').to_string());
            let names =
                Names::from_labels(name, &c.labels.unwrap_or_default()).listed_by(Runtime::Docker);
            (c.id, names)
        })
        .collect())
}
