//! containerd's own API: every namespace's containers with their labels (`k8s.io` holds
//! the kubelet's, labelled by the CRI; `moby` Docker's; `default` those of `ctr`). The
//! CRI's `ListContainers` is not used: it would miss containers not made through it.
use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result, bail};
use containerd_client::{
    services::v1::{
        ListContainersRequest, ListNamespacesRequest, containers_client::ContainersClient,
        namespaces_client::NamespacesClient,
    },
    tonic::Request,
    with_namespace,
};

use super::Names;
use crate::host::container::Runtime;

/// Every container containerd holds, by id, with its names.
pub(super) async fn list(socket: &Path) -> Result<HashMap<String, Names>> {
    if !socket.exists() {
        bail!("no socket there");
    }
    let channel = containerd_client::connect(socket)
        .await
        .context("cannot connect")?;
    let namespaces = NamespacesClient::new(channel.clone())
        .list(ListNamespacesRequest::default())
        .await
        .context("listing namespaces")?
        .into_inner()
        .namespaces;
    let mut names = HashMap::new();
    for ns in namespaces {
        let request = with_namespace!(ListContainersRequest::default(), ns.name.as_str());
        let containers = ContainersClient::new(channel.clone())
            .list(request)
            .await
            .with_context(|| format!("listing the containers of namespace {}", ns.name))?
            .into_inner()
            .containers;
        for c in containers {
            let listed = Names::from_labels(None, &c.labels).listed_by(Runtime::Containerd);
            names.insert(c.id, listed);
        }
    }
    Ok(names)
}
