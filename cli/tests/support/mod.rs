//! Running `roster` processes in tests: spawn, read their output lines with deadlines, signal them,
//! and kill whatever is left when the test ends.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `roster` child process whose stdout lines arrive on a channel. Killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// Starts `roster ARGS...` in `cwd`.
pub fn roster(name: &str, cwd: &Path, args: &[&str]) -> Proc {
    roster_with_env(name, cwd, args, &[])
}

/// Starts `roster ARGS...` in `cwd` with extra environment variables.
pub fn roster_with_env(name: &str, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc {
        name: name.to_owned(),
        child,
        lines,
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line satisfying `pred`, failing the test after `deadline`.
    pub fn line_matching(
        &self,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no line with {what} within {deadline:?}; saw {seen:#?}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{}: exited before printing {what}; saw {seen:#?}",
                        self.name
                    )
                }
            }
        }
    }

    /// Sends `signal` (a name `kill` understands: INT, TERM, KILL).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for the process to exit, failing after `deadline`; returns whether it succeeded.
    pub fn wait_exit(&mut self, deadline: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                start.elapsed() < deadline,
                "{} did not exit within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs to completion (with a deadline) and returns (success, stdout lines).
    pub fn finish(mut self, deadline: Duration) -> (bool, Vec<String>) {
        let ok = self.wait_exit(deadline);
        let lines = self.lines.try_iter().collect();
        (ok, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `roster ARGS...` to completion and returns (success, stdout, stderr).
pub fn run(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run roster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
