//! The vmsnap integration-test harness.
//!
//! Tests run the real programs: a private `dbus-daemon` configured like the system bus with the
//! project's policy ([`TestBus`]), the real `vmsnapd` ([`Daemon`], ready when it says
//! `READY=1`), the real `vmsnap` client ([`Client`]) and real QEMU ([`ForeignQemu`], the
//! [counter guest](guest)). [`TestEnv`] bundles the first three.
//!
//! Invariants: every wait has a [`Deadline`] and readiness is signalled, never slept for;
//! every spawned process is killed and reaped on drop, including guests the daemon leaves
//! behind; the daemon's log is printed when a test panics. The binaries are found next to the
//! test executable (`cargo build --workspace` first) or through `VMSNAPD_BIN` / `VMSNAP_BIN`.

pub mod bus;
pub mod client;
pub mod daemon;
pub mod deadline;
pub mod env;
pub mod guest;
pub mod images;
pub mod install;
pub mod polkit;
pub mod process;
pub mod systemd;
pub mod users;

pub use bus::{EventRecorder, PropertiesChanged, Signal, TestBus, connect, policy_file};
pub use client::Client;
pub use daemon::Daemon;
pub use deadline::{Deadline, STEP_TIMEOUT, poll_until, poll_until_async};
pub use env::{DiskSpec, TestEnv, domain_xml};
pub use guest::{
    COUNTER_ADDR, ForeignDisk, ForeignQemu, Qmp, counter_boot_disk, counter_boot_qcow2,
    counter_boot_sector,
};
pub use images::{
    qemu_img_create, qemu_img_create_overlay, qemu_img_info, qemu_img_snapshots,
    qemu_io_verify_pattern, qemu_io_write_pattern,
};
pub use process::Output;
