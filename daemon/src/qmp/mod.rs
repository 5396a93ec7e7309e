//! The QMP client (filled in by its own change).
