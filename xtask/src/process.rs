//! Running tools (with sentences instead of stack traces when they fail) and supervising
//! long-running children that are always stopped by PID.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// Renders a command as a shell-like line for progress output and error messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".to_string(),
    }
}

/// Explains a spawn failure: a missing program gets a hint on how to install it.
pub fn spawn_error(cmd: &Command, err: &io::Error, hint: &str) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if err.kind() == io::ErrorKind::NotFound {
        anyhow!("`{program}` was not found. {hint}")
    } else {
        anyhow!("could not start `{}`: {err}. {hint}", display(cmd))
    }
}

/// Runs a command with inherited output; a non-zero exit is an error that names the command.
/// `hint` says what to do when it fails (install a tool, read the output above, ...).
pub fn run(cmd: &mut Command, hint: &str) -> Result<()> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, &e, hint))?;
    if !status.success() {
        bail!(
            "`{}` failed ({}). {hint}",
            display(cmd),
            describe_status(status)
        );
    }
    Ok(())
}

/// Runs a command and returns its stdout; stderr is kept for the error message.
pub fn output(cmd: &mut Command, hint: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, &e, hint))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}. {hint}",
            display(cmd),
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process started by us, with its output in a log file. Dropping the guard stops it:
/// SIGTERM to its PID, then SIGKILL after a grace period. Children run in their own process
/// group, so a Ctrl-C in the terminal reaches only xtask, which then stops them in order.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    exited: Option<ExitStatus>,
    /// SIGTERM-to-SIGKILL grace when dropped; zero kills at once.
    drop_grace: Duration,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, hint: &str) -> Result<Self> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating log directory {}", dir.display()))?;
        }
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err_file = file
            .try_clone()
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err_file))
            .process_group(0);
        let child = cmd.spawn().map_err(|e| spawn_error(&cmd, &e, hint))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            exited: None,
            drop_grace: Duration::from_secs(5),
        })
    }

    /// How long a drop waits after SIGTERM before SIGKILL. Tests that stand for a crash, or
    /// only want their processes gone, set zero: SIGKILL at once, nothing drains.
    pub fn set_drop_grace(&mut self, grace: Duration) {
        self.drop_grace = grace;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited (without waiting).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exited = Some(status);
                }
            }
        }
        self.exited
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `ready` until it holds. Fails when the process exits first (with the tail of its
    /// log) or after `timeout` (naming `what` and the log).
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if self.try_exited().is_some() {
                bail!("{}", self.exit_report());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what} did not become ready within {timeout:?}. Last lines of {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 25)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Describes an unexpected exit with the tail of the log.
    pub fn exit_report(&mut self) -> String {
        let status = self
            .try_exited()
            .map(describe_status)
            .unwrap_or_else(|| "still running".into());
        format!(
            "{} exited ({status}). Last lines of {}:\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 25)
        )
    }

    /// Stops the process: SIGTERM, wait up to `grace`, then SIGKILL (at once when `grace` is
    /// zero). Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.exited.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                self.exited = Some(status);
                return;
            }
            if grace.is_zero() {
                let _ = child.kill();
                if let Ok(status) = child.wait() {
                    self.exited = Some(status);
                }
                return;
            }
            send_signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exited = Some(status);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.exited = Some(status);
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(self.drop_grace);
    }
}

/// `program`, pinned to one CPU with `taskset` (util-linux) when `cpu` is given, so a process
/// under measurement and its load generator do not share a core.
pub fn on_cpu(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string()]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// [`on_cpu`], run inside network namespace `netns` when one is given (`ip netns exec`, which
/// execs: the child's PID is still the program's).
pub fn command_in(netns: Option<&Netns>, program: &Path, cpu: Option<usize>) -> Command {
    let Some(ns) = netns else {
        return on_cpu(program, cpu);
    };
    match cpu {
        Some(c) => {
            let mut cmd = ns.exec_in("taskset");
            cmd.args(["-c", &c.to_string()]).arg(program);
            cmd
        }
        None => ns.exec_in(program),
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own child, which we
    // have not reaped yet, so it cannot have been reused by another process.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Last `lines` lines of a (possibly large) log file.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return "(no log)".into();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
