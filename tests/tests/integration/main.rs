//! The one integration-test binary of vmsnap: real vmsnapd, dbus-daemon, QEMU and client.
//!
//! One module per feature. Each test builds what it needs from the `vmsnap_tests` harness and
//! has a deadline for every wait; nextest runs the tests in parallel processes.

mod auth;
mod confinement;
mod domains;
mod frontend;
mod harness_selftest;
mod introspection;
mod mixed_chain;
mod object_manager;
mod readme;
mod recovery;
mod redefine;
mod retention;
mod revert_delete;
mod snapshot_faults;
mod snapshots;
mod stress;
mod surface;
mod systemd;
mod tree;
