//! Snapshots of domains, following libvirt's snapshot design: a *disk snapshot* covers disks
//! only, a *checkpoint* adds the VM state (RAM and devices); per disk a snapshot is *internal*
//! (inside the qcow2 image) or *external* (a new qcow2 overlay backed by the old image), and the
//! VM state is internal (inside a qcow2 image) or external (a file).
//!
//! [`plan`] validates a request into a [`plan::Plan`] before any work is done; [`xml`] reads
//! libvirt's `<domainsnapshot>` creation documents and writes the output format; [`retention`]
//! plans which snapshots a retention policy keeps and deletes; [`schedule`] holds a domain's
//! settings for scheduled snapshots.

pub mod create;
pub mod plan;
pub mod record;
pub mod retention;
pub mod schedule;
pub mod xml;
