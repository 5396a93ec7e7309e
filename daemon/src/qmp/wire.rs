//! The wire format: newline-delimited JSON framing and classification of incoming messages.

use std::os::fd::{AsRawFd, RawFd};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::OwnedReadHalf;

use super::{Event, QemuVersion, QmpError};

/// Upper bound on a single QMP message, so that a misbehaving peer cannot exhaust memory.
pub(super) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Reads newline-terminated messages from the read half of the QMP socket.
pub(super) struct LineReader {
    inner: BufReader<OwnedReadHalf>,
}

impl LineReader {
    pub(super) fn new(read: OwnedReadHalf) -> Self {
        LineReader {
            inner: BufReader::new(read),
        }
    }

    /// The socket's file descriptor, for shutting the connection down.
    pub(super) fn raw_fd(&self) -> RawFd {
        self.inner.get_ref().as_ref().as_raw_fd()
    }

    /// Returns the next non-blank line without its terminator, or `None` at end of stream.
    ///
    /// A partial line followed by end of stream is discarded: QEMU only closes the socket
    /// between messages, and the caller treats end of stream as the connection closing.
    pub(super) async fn next_line(&mut self) -> Result<Option<Vec<u8>>, QmpError> {
        loop {
            let mut line = Vec::new();
            loop {
                let buf = self.inner.fill_buf().await?;
                if buf.is_empty() {
                    if !line.is_empty() {
                        tracing::debug!(bytes = line.len(), "QMP stream ended inside a message");
                    }
                    return Ok(None);
                }
                let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (&buf[..i], i + 1, true),
                    None => (buf, buf.len(), false),
                };
                if line.len() + chunk.len() > MAX_MESSAGE_BYTES {
                    return Err(QmpError::Protocol(format!(
                        "message longer than {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                line.extend_from_slice(chunk);
                self.inner.consume(used);
                if done {
                    break;
                }
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(line));
            }
        }
    }
}

/// An incoming message, classified.
#[derive(Debug)]
pub(super) enum Incoming {
    /// An asynchronous event.
    Event(Event),
    /// A reply to the command with this id; `Err` holds QEMU's error class and description.
    Reply {
        id: Value,
        result: Result<Value, (String, String)>,
    },
    /// A well-formed JSON object of no known kind; ignored with a warning.
    Unknown(Map<String, Value>),
}

/// Parses and classifies one line. Errors are protocol violations.
pub(super) fn parse_message(line: &[u8]) -> Result<Incoming, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        format!(
            "malformed JSON from the peer ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(format!("message is not a JSON object: {value}"));
    };
    if let Some(name) = obj.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| format!("event name is not a string: {name}"))?
            .to_owned();
        let timestamp_micros = obj.get("timestamp").map_or(0, timestamp_micros);
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Incoming::Event(Event {
            name,
            data,
            timestamp_micros,
        }));
    }
    let result = if let Some(ret) = obj.remove("return") {
        Ok(ret)
    } else if let Some(err) = obj.remove("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("");
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
        Err((class.to_owned(), desc.to_owned()))
    } else if obj.contains_key("QMP") {
        return Err("unexpected greeting in the middle of the session".to_owned());
    } else {
        return Ok(Incoming::Unknown(obj));
    };
    let id = obj.remove("id").ok_or_else(|| match &result {
        Ok(_) => "reply without id".to_owned(),
        Err((class, desc)) => format!("error reply without id: {class}: {desc}"),
    })?;
    Ok(Incoming::Reply { id, result })
}

/// Converts QEMU's `{"seconds": s, "microseconds": us}` into microseconds; 0 if absent or negative.
fn timestamp_micros(ts: &Value) -> u64 {
    let secs = ts.get("seconds").and_then(Value::as_u64).unwrap_or(0);
    let micros = ts.get("microseconds").and_then(Value::as_u64).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: GreetingTriple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct GreetingTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

/// Parses the `{"QMP": {"version": ...}}` greeting.
pub(super) fn parse_greeting(line: &[u8]) -> Result<QemuVersion, QmpError> {
    let greeting: Greeting = serde_json::from_slice(line).map_err(|e| {
        QmpError::Protocol(format!(
            "unexpected greeting ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    let v = greeting.qmp.version;
    Ok(QemuVersion {
        major: v.qemu.major,
        minor: v.qemu.minor,
        micro: v.qemu.micro,
        package: v.package.trim().to_owned(),
    })
}
