//! The scenarios, one module each, and what they share.

pub mod bootstrap;
pub mod propagation;
pub mod verify;
pub mod writes;

use crate::cluster;
use crate::machine::{Pinning, affinity, policy};

/// What every scenario gets: the pinning and the options of the processes.
#[derive(Debug)]
pub struct Env {
    pub pinning: Pinning,
    pub options: cluster::Options,
    /// Worker threads of this process's runtime (the load generator).
    pub client_threads: usize,
}

impl Env {
    pub fn cluster_options(&self) -> cluster::Options {
        self.options.clone()
    }
}

/// One line per process: its pid and the cores it may run on.
pub fn print_processes(procs: &[(&str, u32)]) {
    let listed: Vec<String> = procs
        .iter()
        .map(|(name, pid)| {
            let at = match policy(*pid).as_str() {
                "SCHED_OTHER" | "unknown" => String::new(),
                other => format!(" at {other}"),
            };
            format!("{name} (pid {pid}) on core(s) {}{at}", affinity(*pid))
        })
        .collect();
    println!("processes: {}", listed.join("; "));
}
