//! Domain definitions (filled in by its own change).
