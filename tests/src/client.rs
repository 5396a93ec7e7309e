//! The real `vmsnap` command-line client, run to completion under a deadline.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::deadline::Deadline;
use crate::process::{self, Output};
use crate::users::TestUser;

/// Time one client invocation may take unless [`Client::with_timeout`] says otherwise.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `vmsnap --address BUS ...`.
#[derive(Debug, Clone)]
pub struct Client {
    binary: PathBuf,
    bus_address: String,
    timeout: Duration,
    echo: bool,
    /// Run as this user instead of the test's own.
    user: Option<TestUser>,
}

impl Client {
    /// A client of the daemon on the bus at `bus_address`. The binary is `$VMSNAP_BIN` or the
    /// `vmsnap` that cargo built next to the running executable.
    pub fn new(bus_address: &str) -> Self {
        Self {
            binary: process::project_binary("vmsnap", "VMSNAP_BIN"),
            bus_address: bus_address.to_owned(),
            timeout: CLIENT_TIMEOUT,
            echo: false,
            user: None,
        }
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client, run as `user` (see [`crate::users`]).
    pub fn as_user(mut self, user: &TestUser) -> Self {
        self.user = Some(user.clone());
        self
    }

    /// The same client, printing each command line and its output (for the demo).
    pub fn echoing(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Runs the client with `args` after `--address BUS`, whatever its exit status.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = match &self.user {
            Some(user) => user.command(&self.binary),
            None => Command::new(&self.binary),
        };
        cmd.arg("--address").arg(&self.bus_address).args(&args);
        if self.echo {
            let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
            println!("$ vmsnap {}", shown.join(" "));
        }
        let output = process::run(&mut cmd, Deadline::after(self.timeout));
        if self.echo {
            print!("{}", output.stdout);
            eprint!("{}", output.stderr);
            if !output.status.success() {
                println!("(exit status {})", output.code());
            }
        }
        output
    }

    /// Runs the client and returns its stdout; panics with its stderr unless it succeeds.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.run(&args);
        assert!(
            output.status.success(),
            "vmsnap {args:?} failed ({}): {}",
            output.status,
            output.stderr.trim_end()
        );
        output.stdout
    }

    /// Runs `vmsnap --json ARGS` and parses its stdout; panics unless it succeeds with JSON.
    pub fn json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stdout = self.ok(json_args(args));
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("vmsnap --json printed no JSON ({e}):\n{stdout}"))
    }

    /// Runs the client expecting failure; returns the exit code and stderr. Panics if it
    /// succeeds or prints nothing on stderr.
    pub fn err<I, S>(&self, args: I) -> (i32, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.run(&args);
        assert!(
            !output.status.success(),
            "vmsnap {args:?} succeeded but should have failed; stdout:\n{}",
            output.stdout
        );
        assert!(
            !output.stderr.trim().is_empty(),
            "vmsnap {args:?} failed ({}) without a message",
            output.status
        );
        (output.code(), output.stderr)
    }

    /// Runs `vmsnap --json ARGS` expecting failure; returns the error object
    /// `{"error": NAME, "message": ...}` it printed on stderr.
    pub fn err_json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (_, stderr) = self.err(json_args(args));
        serde_json::from_str(stderr.trim())
            .unwrap_or_else(|e| panic!("vmsnap --json printed no JSON error ({e}):\n{stderr}"))
    }
}

fn json_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    std::iter::once(OsString::from("--json"))
        .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
        .collect()
}
