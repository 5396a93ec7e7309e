//! Where a disk image sits in a running guest's block graph, and internal-snapshot jobs on
//! images QEMU holds read-only.
//!
//! An external snapshot turns the images below it into backing files, and QEMU reopens those
//! read-only; its internal-snapshot jobs refuse a read-only node ("Device ... is writable but
//! does not support snapshots"), yet a tag taken before the external snapshot lives exactly
//! there. Overlays the daemon opens carry `json:` pseudo file names in QEMU, so a format node
//! is found through its protocol child (the `file` node whose file name is the image) rather
//! than by its own file name.
//!
//! Invariant: a node made writable for a job is made read-only again before the operation
//! returns, whether the job succeeded or not. Should the daemon die in between, the node stays
//! writable until QEMU exits; that is harmless, since only the job writes to it (the guest
//! writes to its top overlay).

use std::path::Path;

use serde_json::{Value, json};
use tracing::warn;

use crate::error::{ServiceError, ServiceResult};
use crate::qmp::{BlockGraph, Qmp, QmpError};

/// A format node of the running guest and the names of its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatNode {
    /// The node name (`drive-vda`, an overlay's name, or an auto-generated `#block...`).
    pub name: String,
    /// The format driver (`qcow2`).
    pub driver: String,
    /// Whether QEMU holds the node read-only.
    pub read_only: bool,
    /// The node name of its protocol child.
    file_child: String,
    /// The node name of its backing child, if it has one.
    backing_child: Option<String>,
}

impl FormatNode {
    /// `blockdev-reopen` options that keep the node as it is except for `read-only`.
    fn reopen_options(&self, read_only: bool) -> Value {
        json!({
            "driver": self.driver,
            "node-name": self.name,
            "file": self.file_child,
            "backing": self.backing_child,
            "read-only": read_only,
        })
    }
}

/// The running guest's named nodes and their edges, read once for several lookups (on a long
/// chain QEMU takes milliseconds to build the node list).
pub struct Graph {
    nodes: Vec<crate::qmp::BlockDeviceInfo>,
    graph: BlockGraph,
}

impl Graph {
    /// Reads the node list and the graph from QEMU.
    pub async fn fetch(qmp: &Qmp) -> Result<Graph, QmpError> {
        Ok(Graph {
            nodes: qmp.query_named_block_nodes().await?,
            graph: qmp.query_block_graph().await?,
        })
    }

    /// The format node whose protocol child opens `image`, or `None` when the guest does not
    /// use the file.
    pub fn format_node_of(&self, image: &Path) -> Option<FormatNode> {
        find_format_node(&self.nodes, &self.graph, image)
    }
}

/// The pure part of [`Graph::format_node_of`].
fn find_format_node(
    nodes: &[crate::qmp::BlockDeviceInfo],
    graph: &BlockGraph,
    image: &Path,
) -> Option<FormatNode> {
    let info = |name: &str| nodes.iter().find(|n| n.node_name == name);
    let name_of = |id: u64| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id && n.kind == "block-driver")
            .map(|n| n.name.as_str())
    };
    let child = |parent: u64, role: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.parent == parent && e.name == role)
            .and_then(|e| name_of(e.child))
    };
    graph
        .edges
        .iter()
        .filter(|e| e.name == "file")
        .find_map(|e| {
            let proto = info(name_of(e.child)?)?;
            if proto.drv != "file" || Path::new(&proto.file) != image {
                return None;
            }
            let parent = info(name_of(e.parent)?)?;
            Some(FormatNode {
                name: parent.node_name.clone(),
                driver: parent.drv.clone(),
                read_only: parent.ro,
                file_child: proto.node_name.clone(),
                backing_child: child(e.parent, "backing").map(str::to_owned),
            })
        })
}

/// Runs `job` (an internal-snapshot job on `node`) with the node writable, restoring its
/// read-only state afterwards.
pub async fn with_writable<T>(
    qmp: &Qmp,
    node: &FormatNode,
    job: impl std::future::Future<Output = ServiceResult<T>>,
) -> ServiceResult<T> {
    if !node.read_only {
        return job.await;
    }
    qmp.blockdev_reopen(vec![node.reopen_options(false)])
        .await
        .map_err(ServiceError::qemu(format!(
            "cannot open backing node {} for writing",
            node.name
        )))?;
    let result = job.await;
    if let Err(e) = qmp.blockdev_reopen(vec![node.reopen_options(true)]).await {
        // Not an error of the operation: the job's effect stands, and a writable backing node
        // is written by nothing else.
        warn!(node = %node.name, error = %e, "could not make a backing node read-only again");
    }
    result
}

/// Deletes internal tag `tag` from `image` through the running guest's QEMU (whose nodes
/// `graph` holds) with a `snapshot-delete` job named `job_id`. `Ok(false)` when the guest does
/// not use the image (the caller edits the file offline instead).
pub async fn delete_tag_live(
    qmp: &Qmp,
    graph: &Graph,
    image: &Path,
    tag: &str,
    job_id: &str,
    what: &str,
) -> ServiceResult<bool> {
    let Some(node) = graph.format_node_of(image) else {
        return Ok(false);
    };
    with_writable(qmp, &node, async {
        let mut events = qmp.subscribe();
        qmp.execute(
            "snapshot-delete",
            Some(json!({"job-id": job_id, "tag": tag, "devices": [node.name]})),
        )
        .await
        .map_err(ServiceError::qemu(format!("cannot start {what}")))?;
        crate::snapshot::create::wait_job_concluded(qmp, &mut events, job_id, what).await
    })
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_and_nodes() -> (Vec<crate::qmp::BlockDeviceInfo>, BlockGraph) {
        // The shape QEMU 7.2 reports after one external snapshot of `drive-vda` onto overlay
        // `ov-1-vda` whose protocol node was given inline.
        let nodes = serde_json::from_value(json!([
            {"node-name": "ov-1-vda", "drv": "qcow2", "ro": false,
             "file": "json:{\"backing\": {}}", "image": {"filename": "x", "format": "qcow2", "virtual-size": 1}},
            {"node-name": "#block191", "drv": "file", "ro": false, "file": "/img/vda.1.qcow2",
             "image": {"filename": "/img/vda.1.qcow2", "format": "file", "virtual-size": 1}},
            {"node-name": "drive-vda", "drv": "qcow2", "ro": true, "file": "/img/vda.qcow2",
             "image": {"filename": "/img/vda.qcow2", "format": "qcow2", "virtual-size": 1}},
            {"node-name": "file-vda", "drv": "file", "ro": false, "file": "/img/vda.qcow2",
             "image": {"filename": "/img/vda.qcow2", "format": "file", "virtual-size": 1}},
        ]))
        .unwrap();
        let graph = serde_json::from_value(json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": "/machine/peripheral/vda/virtio-backend"},
                {"id": 2, "type": "block-driver", "name": "ov-1-vda"},
                {"id": 7, "type": "block-driver", "name": "#block191"},
                {"id": 4, "type": "block-driver", "name": "drive-vda"},
                {"id": 3, "type": "block-driver", "name": "file-vda"},
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root"},
                {"parent": 2, "child": 7, "name": "file"},
                {"parent": 2, "child": 4, "name": "backing"},
                {"parent": 4, "child": 3, "name": "file"},
            ],
        }))
        .unwrap();
        (nodes, graph)
    }

    #[test]
    fn find_format_node_with_json_file_name_finds_it_by_protocol_child() {
        let (nodes, graph) = graph_and_nodes();
        let n = find_format_node(&nodes, &graph, Path::new("/img/vda.1.qcow2")).unwrap();
        assert_eq!(n.name, "ov-1-vda");
        assert!(!n.read_only);
        assert_eq!(
            n.reopen_options(true),
            json!({"driver": "qcow2", "node-name": "ov-1-vda", "file": "#block191",
                   "backing": "drive-vda", "read-only": true})
        );
    }

    #[test]
    fn find_format_node_of_backing_file_reports_read_only_and_no_backing() {
        let (nodes, graph) = graph_and_nodes();
        let n = find_format_node(&nodes, &graph, Path::new("/img/vda.qcow2")).unwrap();
        assert_eq!(n.name, "drive-vda");
        assert!(n.read_only);
        assert_eq!(n.reopen_options(false)["backing"], Value::Null);
    }

    #[test]
    fn find_format_node_of_unused_file_is_none() {
        let (nodes, graph) = graph_and_nodes();
        assert_eq!(
            find_format_node(&nodes, &graph, Path::new("/img/other.qcow2")),
            None
        );
    }
}
