//! The D-Bus contract of vmsnap: bus and interface names, object path layout, the typed wire
//! errors and client-side proxies.
//!
//! This crate is shared by the daemon, the command-line client and the tests. It never depends
//! on the daemon. The introspection XML of the running daemon is committed beside it as
//! `org.vmsnap.VmSnap1.xml`; a test compares the two.

pub mod error;
pub mod introspection;
pub mod names;
pub mod proxy;

pub use error::Error;

/// The committed introspection XML of every vmsnap interface, as the daemon serves it.
pub const INTROSPECTION_XML: &str = include_str!("../org.vmsnap.VmSnap1.xml");
