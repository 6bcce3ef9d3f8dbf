//! Child processes for the interop test. Every client command runs under a deadline and every
//! daemon sits in a guard that kills it on drop, so a failed assertion never leaves a registry,
//! a mirror or a containerd running, and a hung tool fails the test instead of stalling CI.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a daemon may take to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one client command (a push, a pull, an inspect) may take. Generous: CI machines are
/// slow and the images are a few MiB, but a hang must still end.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// Finds `bin` on PATH (and in the sbin directories, which root's PATH may lack). A missing tool
/// fails the test and names the Debian package: CI installs them, so a silent skip would only
/// hide a broken setup.
pub fn require_tool(bin: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), "/sbin".into()]);
    for dir in dirs {
        let candidate = dir.join(bin);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the interop test needs `{bin}`, which is not installed: \
         run `apt-get install -y {package}` (.ci/run does)"
    );
}

/// A command for one of the tools. Everything in this test talks to 127.0.0.1, so proxy
/// settings inherited from the caller's environment could only send traffic somewhere wrong.
pub fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `cmd` to completion and panics, with its output, unless it exits 0 within `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let output = try_run(cmd, timeout);
    assert!(
        output.status.success(),
        "`{}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        describe(cmd),
        output.status,
        output.stdout_text(),
        output.stderr
    );
    output
}

/// Runs `cmd` to completion whatever its exit status; panics only if it outlives `timeout`
/// (after killing it).
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(cmd)));
    // Both pipes are drained on their own threads: a tool that fills one pipe while we wait on
    // the other would otherwise deadlock until the timeout.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on a child process") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(POLL);
    };
    let stdout = stdout.join().expect("stdout reader thread");
    let stderr =
        String::from_utf8_lossy(&stderr.join().expect("stderr reader thread")).into_owned();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "`{}` did not finish within {timeout:?}:\n--- stdout\n{}\n--- stderr\n{stderr}",
            describe(cmd),
            String::from_utf8_lossy(&stdout)
        ),
    }
}

/// The command line as a user would type it (Command's Debug also lists every removed variable).
fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Polls `probe` until it returns `Ok`, panicking after `timeout` with `what` and the last
/// reason `probe` gave for not being ready.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(why) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// A long-running process whose stdout and stderr go to a log file. A file rather than a pipe:
/// nobody has to keep reading it for the daemon to make progress, and the test can read it
/// whenever it likes. Killed on drop; on a failing test its log tail is printed.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Daemon {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = file.try_clone().expect("duplicating a file handle");
        let child = cmd
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{}`): {e}", describe(cmd)));
        Daemon {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The daemon's exit status, if it has exited (it is then reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits until `find` recognises a line of the log, failing early if the daemon exits.
    pub fn wait_for_log<T>(&mut self, what: &str, mut find: impl FnMut(&str) -> Option<T>) -> T {
        let name = self.name.clone();
        wait_for(&format!("{name} to log {what}"), START_TIMEOUT, || {
            if let Some(found) = self.log().lines().find_map(&mut find) {
                return Ok(found);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{name} exited ({status}) before logging {what}; its log:\n{}",
                    self.log()
                );
            }
            Err(format!("not in its log yet:\n{}", self.log()))
        })
    }

    /// Asks the daemon to shut down (SIGTERM, as an init system would) and waits for it, killing
    /// it if it takes too long.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                eprintln!(
                    "{} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} lines of {} ({})\n{}",
                tail.len(),
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Reads a file the test itself wrote or a tool produced; a failure is a broken test setup.
pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
