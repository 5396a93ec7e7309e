//! Test hooks: behaviour that only the project's tests switch on, through the environment
//! variable `VMSNAPD_TEST_HOOKS` (a comma-separated list). Production never sets it; the
//! systemd unit does not pass it on.
//!
//! - `share-rw`: every disk device shares write permission (`share-rw=on`), so tests can write
//!   data patterns into a running guest's disks with HMP `qemu-io`, which opens a second user
//!   of the disk's node. Snapshot mechanics are the same with or without it.

/// The environment variable holding the enabled hooks.
pub const TEST_HOOKS_ENV: &str = "VMSNAPD_TEST_HOOKS";

/// Whether hook `name` is enabled.
pub fn enabled(name: &str) -> bool {
    std::env::var(TEST_HOOKS_ENV)
        .map(|v| v.split(',').any(|h| h.trim() == name))
        .unwrap_or(false)
}
