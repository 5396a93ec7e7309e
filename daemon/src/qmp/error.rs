//! The error type of the QMP client.

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to, reading from or writing to the QMP socket failed.
    #[error("QMP socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not valid QMP (malformed JSON, a bad greeting,
    /// a reply without an id, a reply of an unexpected shape).
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error object.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// QEMU's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description of the error.
        desc: String,
        /// The command that failed.
        command: String,
    },
    /// The connection is gone: QEMU exited or closed the socket.
    #[error("QMP connection is closed")]
    Closed,
    /// A deadline passed; the text names what was waited for.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl QmpError {
    /// The QEMU error class if this is a [`QmpError::Command`] error.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}
