//! A small synchronous QMP client for the floor measurements: commands matched by `id`,
//! events kept in arrival order and waited for, and file descriptors passed with
//! `SCM_RIGHTS` (for `getfd`), which std's `UnixStream` cannot do.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};

/// How long QEMU has to answer a command or send an awaited event.
const TIMEOUT: Duration = Duration::from_secs(600);

/// One QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying until QEMU listens, up to 30 s), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream.set_read_timeout(Some(TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed the QMP connection");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message: {line}"))
    }

    fn send(&mut self, command: &str, arguments: Value, fd: Option<BorrowedFd<'_>>) -> Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        let line = format!(
            "{}\n",
            json!({"execute": command, "arguments": arguments, "id": id})
        );
        match fd {
            None => self.writer.write_all(line.as_bytes())?,
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let iov = [IoSlice::new(line.as_bytes())];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let sent = sendmsg::<()>(
                    self.writer.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                )?;
                self.writer.write_all(&line.as_bytes()[sent..])?;
            }
        }
        Ok(id)
    }

    fn reply(&mut self, id: u64, command: &str) -> Result<Value> {
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if message.get("id") == Some(&json!(id)) {
                if let Some(value) = message.get("return") {
                    return Ok(value.clone());
                }
                return Err(anyhow!("QMP {command} failed: {}", message["error"]));
            }
        }
    }

    /// Runs a command and returns its `return` value; a QMP error is an `Err`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.send(command, arguments, None)?;
        self.reply(id, command)
    }

    /// Like [`Qmp::execute`], passing `fd` with the command (for `getfd`).
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        let id = self.send(command, arguments, Some(fd))?;
        self.reply(id, command)
    }

    /// Runs an HMP command line and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let reply = self.execute(
            "human-monitor-command",
            json!({"command-line": command_line}),
        )?;
        Ok(reply.as_str().unwrap_or_default().to_owned())
    }

    /// Forgets the events received so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// Waits for (and consumes) the first event, received or still to come, that satisfies
    /// `pred`; earlier non-matching events stay queued.
    pub fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.events.iter().position(&pred) {
                return Ok(self.events.remove(i));
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
            }
        }
    }

    /// Waits for `JOB_STATUS_CHANGE` of job `id` to `status`.
    pub fn wait_job(&mut self, id: &str, status: &str) -> Result<()> {
        self.wait_event(&format!("job {id} {status}"), |e| {
            e["event"] == "JOB_STATUS_CHANGE"
                && e["data"]["id"] == id
                && e["data"]["status"] == status
        })?;
        Ok(())
    }

    /// Runs a job-starting command, waits until the job concludes, reads its error (if any)
    /// with `query-jobs` and dismisses it: the shape of `snapshot-save`/`-load`/`-delete`.
    pub fn run_job(&mut self, command: &str, job_id: &str, arguments: Value) -> Result<()> {
        self.execute(command, arguments)?;
        self.wait_job(job_id, "concluded")?;
        let jobs = self.execute("query-jobs", json!({}))?;
        let error = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"] == job_id)
            .and_then(|j| j.get("error"))
            .cloned();
        self.execute("job-dismiss", json!({"id": job_id}))?;
        if let Some(error) = error {
            bail!("{command} job {job_id} failed: {error}");
        }
        Ok(())
    }
}
