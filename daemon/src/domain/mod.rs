//! Domains: definitions (the libvirt-XML subset), the QEMU command line built from them, and
//! the per-guest actor that alone owns a QEMU process and its QMP session.

pub mod actor;
pub mod def;
pub mod launch;
pub mod nodes;
pub mod qemu_cmd;
pub mod recover;
mod redefine;
mod retention;
mod revert;
pub mod state;
