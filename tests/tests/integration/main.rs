//! The one integration-test binary of vmsnap: real vmsnapd, dbus-daemon, QEMU and client.
//!
//! One module per feature. Each test builds what it needs from the `vmsnap_tests` harness and
//! has a deadline for every wait; nextest runs the tests in parallel processes.

mod domains;
mod harness_selftest;
mod introspection;
mod revert_delete;
mod snapshot_faults;
mod snapshots;
mod stress;
mod tree;
