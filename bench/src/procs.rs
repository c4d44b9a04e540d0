//! Child processes: `twofold control`, `twofold data` and the bare ceiling
//! server, each started (pinned with `taskset` when asked), awaited until it
//! prints where it listens, and killed when its [`Proc`] is dropped, so an error
//! or a panic never leaves one behind.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::http;

/// How long a process may take to say where it listens.
const START_WAIT: Duration = Duration::from_secs(60);
/// Output lines kept per process, for error reports.
const LOG_LINES: usize = 50;

/// What to start.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Shown in reports (`control`, `data-1`, `ceiling`).
    pub name: String,
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// A `taskset -c` core list, or none to let it float.
    pub cpus: Option<String>,
    /// Run at `SCHED_IDLE` (`chrt --idle 0`): on a shared core, every other
    /// process's wake-up preempts it at once.
    pub idle: bool,
    /// The stdout line that precedes `ADDR`, e.g. `twofold data listening on http://`.
    pub ready_prefix: String,
}

type Log = Arc<Mutex<VecDeque<String>>>;

/// A running child process. Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    /// Closed when this process exits, however it exits: a child that reads its
    /// stdin (the ceiling server) stops at end of file even if the bench was
    /// SIGKILLed and no guard ran. `twofold` ignores its stdin.
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
    log: Log,
}

impl Proc {
    /// Start `spec` and wait until it prints its listening line.
    pub async fn start(spec: &Spawn) -> anyhow::Result<Proc> {
        // chrt and taskset exec what follows them, so the child's pid is the
        // program's.
        let mut line: Vec<OsString> = Vec::new();
        if spec.idle {
            line.extend(["chrt", "--idle", "0"].map(OsString::from));
        }
        if let Some(cpus) = &spec.cpus {
            line.extend([OsString::from("taskset"), "-c".into(), cpus.into()]);
        }
        line.push(spec.exe.clone().into_os_string());
        let mut command = Command::new(&line[0]);
        command.args(&line[1..]).args(&spec.args);
        // Only what the bench sets: nothing from the caller's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TWOFOLD_") {
                command.env_remove(&key);
            }
        }
        command
            .envs(spec.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", spec.exe.display()))?;
        let stdin = child.stdin.take();
        let log: Log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        if let Some(stdout) = child.stdout.take() {
            drain(stdout, log.clone(), Some((spec.ready_prefix.clone(), tx)));
        }
        if let Some(stderr) = child.stderr.take() {
            drain(stderr, log.clone(), None);
        }
        // From here on, dropping `proc` kills the child.
        let mut proc = Proc {
            name: spec.name.clone(),
            child,
            _stdin: stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match tokio::time::timeout(START_WAIT, rx).await {
            Ok(Ok(addr)) => {
                proc.addr = addr;
                Ok(proc)
            }
            Ok(Err(_)) => bail!(
                "{} exited before listening; last output:\n{}",
                spec.name,
                proc.logs()
            ),
            Err(_) => bail!(
                "{} did not say where it listens within {START_WAIT:?}; last output:\n{}",
                spec.name,
                proc.logs()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last lines the process wrote.
    pub fn logs(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Ask the process to stop (SIGTERM) and wait for it; SIGKILL it if it has
    /// not exited within `within`.
    pub async fn terminate(mut self, within: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "{} did not exit within {within:?} of SIGTERM; killed",
            self.name
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Fails only if it already exited and was reaped; wait regardless.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Read a child's output on a thread, keeping the last lines; on stdout, send
/// the address of the first line starting with the ready prefix.
fn drain(
    stream: impl Read + Send + 'static,
    log: Log,
    mut ready: Option<(String, tokio::sync::oneshot::Sender<SocketAddr>)>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some((prefix, _)) = &ready
                && let Some(rest) = line.strip_prefix(prefix.as_str())
                && let Ok(addr) = http::addr_of(rest.trim())
                && let Some((_, tx)) = ready.take()
            {
                let _ = tx.send(addr);
            }
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() == LOG_LINES {
                log.pop_front();
            }
            log.push_back(line);
        }
    });
}

/// Where the `twofold` binary is: `--twofold`, else next to this executable
/// (`target/release/twofold` when run with `cargo run --release`).
pub fn find_twofold(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("twofold"),
    };
    if !path.is_file() {
        bail!(
            "no twofold binary at {}: build it first with `cargo build --release -p twofold`, \
             or pass --twofold PATH",
            path.display()
        );
    }
    Ok(path)
}
