//! The QEMU command line (filled in by its own change).
