//! vmsnapd: the vmsnap daemon as a library, so that the binary stays thin and tests can drive it.

pub mod catalog;
pub mod domain;
pub mod qmp;
pub mod snapshot;
