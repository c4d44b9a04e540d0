//! The machine a run happens on: cores, how they are split between the servers
//! and the load generator (with `taskset`), and what `/proc` says about a
//! process's CPU time and memory.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;

/// How processes are pinned to cores.
#[derive(Debug, Clone)]
pub struct Pinning {
    /// `taskset -c` lists, or `None` when pinning is off or taskset is missing.
    pub server: Option<String>,
    pub client: Option<String>,
    /// Why there is no pinning, if there is none.
    pub note: Option<String>,
}

impl Pinning {
    /// Pin servers to `server` and this process to `client`, if taskset works.
    /// Must run before any thread is started: threads inherit the affinity of the
    /// thread that creates them, and only the main thread exists yet.
    pub fn apply(server: &str, client: &str, enabled: bool) -> Pinning {
        if !enabled {
            return Pinning::off("pinning disabled (--no-pin)");
        }
        let works = Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !works {
            return Pinning::off("taskset not found; processes float over all cores");
        }
        let pid = std::process::id().to_string();
        let pinned = Command::new("taskset")
            .args(["-c", "-p", client, &pid])
            .output()
            .is_ok_and(|o| o.status.success());
        if !pinned {
            return Pinning::off("taskset could not pin this process; processes float");
        }
        Pinning {
            server: Some(server.to_owned()),
            client: Some(client.to_owned()),
            note: None,
        }
    }

    /// Whether this process's cores are pinned and shared with none of
    /// `others` (`taskset -c` lists): then it may spin without taking CPU
    /// from what it measures.
    pub fn client_alone(&self, others: &[Option<&str>]) -> bool {
        let Some(client) = self.client.as_deref().and_then(cpu_list) else {
            return false;
        };
        others.iter().all(|other| {
            other
                .and_then(cpu_list)
                .is_some_and(|cores| cores.iter().all(|c| !client.contains(c)))
        })
    }

    fn off(note: &str) -> Pinning {
        Pinning {
            server: None,
            client: None,
            note: Some(note.to_owned()),
        }
    }
}

/// Facts printed at the top of every report.
#[derive(Debug, Clone)]
pub struct Facts {
    pub nproc: usize,
    pub cpu_model: String,
    pub profile: &'static str,
    pub twofold: String,
}

impl Facts {
    /// `nproc` is taken by the caller before pinning narrows what this process
    /// sees.
    pub fn gather(nproc: usize, twofold: &Path) -> Facts {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Facts {
            nproc,
            cpu_model,
            profile: if cfg!(debug_assertions) {
                "debug (figures are meaningless: use --release)"
            } else {
                "release"
            },
            twofold: twofold.display().to_string(),
        }
    }

    pub fn print(&self, pinning: &Pinning) {
        println!("machine: nproc = {}, cpu = {}", self.nproc, self.cpu_model);
        println!("twofold-bench build profile: {}", self.profile);
        println!("twofold binary: {}", self.twofold);
        match (&pinning.server, &pinning.client) {
            (Some(server), Some(client)) => println!(
                "pinning (taskset): servers on core(s) {server}, twofold-bench (load generator) on core(s) {client}"
            ),
            _ => println!(
                "pinning: none ({})",
                pinning.note.as_deref().unwrap_or("unknown")
            ),
        }
    }
}

/// The cores a process may run on, as `taskset -cp` reports them.
pub fn affinity(pid: u32) -> String {
    Command::new("taskset")
        .args(["-c", "-p", &pid.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .rsplit_once(':')
                .map(|(_, list)| list.trim().to_owned())
        })
        .unwrap_or_else(|| "any".to_owned())
}

/// The cores of a `taskset -c` list such as `0`, `0,1` or `0-3,6`; `None` if
/// it does not parse.
fn cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cores = Vec::new();
    for part in list.split(',') {
        match part.trim().split_once('-') {
            Some((a, b)) => cores.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse().ok()?),
            None => cores.push(part.trim().parse().ok()?),
        }
    }
    Some(cores)
}

/// The scheduling policy of `pid` as `chrt -p` names it (`SCHED_OTHER`,
/// `SCHED_IDLE`, ...), or `unknown`.
pub fn policy(pid: u32) -> String {
    Command::new("chrt")
        .args(["-p", &pid.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.lines()
                .find(|l| l.contains("policy"))
                .and_then(|l| l.rsplit_once(':'))
                .map(|(_, p)| p.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Clock ticks per second of `/proc/<pid>/stat` times, asked once.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// User plus system CPU time a process has used, all threads included.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_time_of(&stat, clock_ticks())
}

/// Parse utime and stime (fields 14 and 15) from a `/proc/<pid>/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn cpu_time_of(stat: &str, ticks_per_sec: f64) -> Option<Duration> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_sec,
    ))
}

/// Resident memory of a process: now (`VmRSS`) and its peak (`VmHWM`), in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    memory_of(&status).with_context(|| format!("no VmRSS/VmHWM in /proc/{pid}/status"))
}

fn memory_of(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// CPU time used by a set of processes between two readings.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<Option<Duration>>,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start: pids.iter().map(|&p| cpu_time(p)).collect(),
        }
    }

    /// CPU used since `start`, as a share of one core over `wall`, per process.
    pub fn shares(&self, wall: Duration) -> Vec<Option<f64>> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&pid, start)| {
                let used = cpu_time(pid)?.checked_sub((*start)?)?;
                Some(used.as_secs_f64() / wall.as_secs_f64().max(1e-9))
            })
            .collect()
    }
}

/// A CPU share as a percentage of one core, or `-`.
pub fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".to_owned(), |s| format!("{:.0}%", s * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse_and_spinning_needs_cores_of_its_own() {
        assert_eq!(cpu_list("0"), Some(vec![0]));
        assert_eq!(cpu_list("0-3, 6"), Some(vec![0, 1, 2, 3, 6]));
        assert_eq!(cpu_list("0,x"), None);
        let pinned = |client: &str| Pinning {
            server: Some("0".into()),
            client: Some(client.into()),
            note: None,
        };
        assert!(pinned("1").client_alone(&[Some("0"), Some("0")]));
        assert!(!pinned("1").client_alone(&[Some("0"), Some("1")]));
        assert!(!pinned("0-1").client_alone(&[Some("0")]));
        // A process that floats may run anywhere.
        assert!(!pinned("1").client_alone(&[Some("0"), None]));
        assert!(!Pinning::off("no taskset").client_alone(&[Some("0")]));
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let stat = "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 10";
        assert_eq!(cpu_time_of(stat, 100.0), Some(Duration::from_secs(3)));
        assert_eq!(cpu_time_of("garbage", 100.0), None);
    }

    #[test]
    fn status_memory_is_read_in_bytes() {
        let status = "Name:\ttwofold\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        let m = memory_of(status).unwrap();
        assert_eq!((m.rss, m.peak), (1024 * 1024, 2048 * 1024));
        assert!(memory_of("Name: x\n").is_none());
    }
}
