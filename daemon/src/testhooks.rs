//! Test hooks: behaviour that only the project's tests switch on, through the environment
//! variable `VMSNAPD_TEST_HOOKS` (a comma-separated list of `name` or `name=value` entries).
//! Production never sets it; the systemd unit does not pass it on.
//!
//! - `share-rw`: every disk device shares write permission (`share-rw=on`), so tests can write
//!   data patterns into a running guest's disks with HMP `qemu-io`, which opens a second user
//!   of the disk's node. Snapshot mechanics are the same with or without it.
//! - `fail-at=STEP` or `fail-at=STEP:NAME`: snapshot creation fails at `STEP` (for every
//!   snapshot, or only for the one named `NAME`), so tests can prove the rollback of each step.
//!   The steps are `after-overlays`, `after-memory`, `after-transaction` (live) and
//!   `after-disks` (offline); see `snapshot::create`. The entry may be given more than once.
//! - `migrate-bandwidth=BYTES`: the bandwidth limit, in bytes per second, of writing external
//!   VM state to a file, so that a test can make the save slow enough to cancel it.
//! - `crash-at=STEP`: the daemon aborts (as `kill -9` would) right after journaling `STEP`,
//!   one of `journal::STEPS`, so tests can prove crash recovery at every step.
//! - `list-crash-steps`: `vmsnapd` prints `journal::STEPS`, one a line, and exits, so tests
//!   iterate the daemon's own list.
//! - `hang-main-loop-after=SECONDS`: the daemon's main loop blocks its thread for good that
//!   long after `READY=1`, as a deadlock would; the watchdog pings stop, so tests can see
//!   systemd restart the daemon.
//! - `delay-ready=SECONDS`: the daemon waits that long after owning its bus name before it
//!   sends `READY=1`, so tests can see the unit stay `activating` until then.

/// The environment variable holding the enabled hooks.
pub const TEST_HOOKS_ENV: &str = "VMSNAPD_TEST_HOOKS";

/// The hook list as set in the environment; empty when unset.
fn list() -> String {
    std::env::var(TEST_HOOKS_ENV).unwrap_or_default()
}

/// The entries of a hook list, trimmed, empty ones left out.
fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|h| !h.is_empty())
}

/// The values of every `name=value` entry of `list`, in the order given.
fn values_in(list: &str, name: &str) -> Vec<String> {
    entries(list)
        .filter_map(|h| h.split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// Whether hook `name` is enabled.
pub fn enabled(name: &str) -> bool {
    entries(&list()).any(|h| h == name)
}

/// The values of every `name=value` entry, in the order given.
pub fn values(name: &str) -> Vec<String> {
    values_in(&list(), name)
}

/// The value of the first `name=value` entry, if any.
pub fn value(name: &str) -> Option<String> {
    values(name).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_from_name_value_entries_only() {
        let list = "share-rw, fail-at=after-memory ,migrate-bandwidth=4096,fail-at=after-disks:s1,";
        assert_eq!(
            values_in(list, "fail-at"),
            vec!["after-memory".to_string(), "after-disks:s1".to_string()]
        );
        assert_eq!(
            values_in(list, "migrate-bandwidth"),
            vec!["4096".to_string()]
        );
        assert!(values_in(list, "share-rw").is_empty());
        assert!(values_in(list, "fail").is_empty());
        assert!(entries(list).any(|h| h == "share-rw"));
        assert!(!entries(list).any(|h| h == "fail-at"));
    }
}
