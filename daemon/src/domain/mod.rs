//! Domains: definitions (the libvirt-XML subset), the QEMU command line built from them, and
//! the per-guest actor that alone owns a QEMU process and its QMP session.

pub mod actor;
pub mod def;
pub mod launch;
pub mod qemu_cmd;
mod redefine;
mod retention;
pub mod recover;
mod revert;
pub mod state;
