//! A Twofold deployment on 127.0.0.1 for one scenario: a control plane with a
//! tenant and its keys, and any number of data planes, all real processes of
//! the `twofold` binary in a temporary directory removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::StatusCode;
use hyper::header::HeaderValue;
use serde::Deserialize;
use serde_json::json;
use tempfile::TempDir;
use twofold_core::seal::{Keyring, MasterKey};

use crate::http::{self, Conn, Reply};
use crate::procs::{Proc, Spawn};

/// The operator token every control plane started here accepts.
pub const OPERATOR: &str = "tfo_bench-operator-token-0123456789abcdef";
/// How often a waiting loop looks again.
const POLL: Duration = Duration::from_millis(5);

/// Settings shared by every process of a scenario.
#[derive(Debug, Clone)]
pub struct Options {
    pub twofold: PathBuf,
    /// `TWOFOLD_LOG` of the planes.
    pub server_log: String,
    /// Parent of the temporary working directory.
    pub work_dir: Option<PathBuf>,
    /// The control plane's `--database`; `None` for SQLite in its directory.
    pub database: Option<String>,
    /// Run the control plane at `SCHED_IDLE` (`chrt --idle 0`).
    pub control_idle: bool,
}

/// The credentials a scenario uses.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub verify_key: String,
    pub manage_key: String,
    pub node_key: String,
}

/// What data planes report on `/readyz`.
#[derive(Debug, Deserialize)]
pub struct DataReady {
    pub applied_seq: u64,
}

#[derive(Debug, Deserialize)]
struct ControlReady {
    head_seq: u64,
}

/// A control plane, its tenant and the data planes started so far.
#[derive(Debug)]
pub struct Cluster {
    pub options: Options,
    pub work: TempDir,
    pub master_key: String,
    pub keyring: Keyring,
    pub control: Option<Proc>,
    pub control_cpus: Option<String>,
    pub tenant: Tenant,
    pub operator: HeaderValue,
    started_data: usize,
}

impl Cluster {
    /// Start a control plane on a fresh database and create a tenant with a
    /// verify key, a manage key and a node key.
    pub async fn start(options: Options, control_cpus: Option<String>) -> anyhow::Result<Cluster> {
        let work = match &options.work_dir {
            Some(dir) => tempfile::Builder::new()
                .prefix("twofold-bench-")
                .tempdir_in(dir),
            None => tempfile::Builder::new().prefix("twofold-bench-").tempdir(),
        }
        .context("cannot create a working directory")?;
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
        let master_key = data_encoding::BASE64.encode(&bytes);
        let keyring = Keyring::new(MasterKey::from_bytes(&bytes).context("master key")?);
        let mut cluster = Cluster {
            options,
            work,
            master_key,
            keyring,
            control: None,
            control_cpus,
            tenant: Tenant {
                id: String::new(),
                verify_key: String::new(),
                manage_key: String::new(),
                node_key: String::new(),
            },
            operator: http::bearer(OPERATOR)?,
            started_data: 0,
        };
        cluster.start_control().await?;
        cluster.tenant = cluster.create_tenant("bench").await?;
        Ok(cluster)
    }

    pub fn control_dir(&self) -> PathBuf {
        self.work.path().join("control")
    }

    pub fn control_db(&self) -> PathBuf {
        self.control_dir().join("control.db")
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TWOFOLD_MASTER_KEY".into(), self.master_key.clone()),
            ("TWOFOLD_LOG".into(), self.options.server_log.clone()),
        ]
    }

    /// Start (or restart) the control plane on its database.
    pub async fn start_control(&mut self) -> anyhow::Result<()> {
        self.control = None;
        let mut envs = self.env();
        envs.push(("TWOFOLD_OPERATOR_TOKEN".into(), OPERATOR.into()));
        let spec = Spawn {
            name: "control".into(),
            exe: self.options.twofold.clone(),
            args: vec![
                "control".into(),
                "--data-dir".into(),
                path_arg(&self.control_dir()),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ]
            .into_iter()
            .chain(
                self.options
                    .database
                    .iter()
                    .flat_map(|url| ["--database".to_owned(), url.clone()]),
            )
            .collect(),
            envs,
            cpus: self.control_cpus.clone(),
            idle: self.options.control_idle,
            ready_prefix: "twofold control listening on http://".into(),
        };
        self.control = Some(Proc::start(&spec).await?);
        Ok(())
    }

    /// Stop the control plane cleanly (SIGTERM), so its database can be written.
    pub async fn stop_control(&mut self) -> anyhow::Result<()> {
        if let Some(control) = self.control.take() {
            control.terminate(Duration::from_secs(20)).await?;
        }
        Ok(())
    }

    pub fn control(&self) -> anyhow::Result<&Proc> {
        self.control
            .as_ref()
            .context("the control plane is not running")
    }

    /// A fresh connection to the control plane.
    pub fn control_conn(&self) -> anyhow::Result<Conn> {
        Ok(Conn::new(self.control()?.addr()))
    }

    async fn create_tenant(&self, name: &str) -> anyhow::Result<Tenant> {
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let mut conn = self.control_conn()?;
        let op = Some(&self.operator);
        let tenant: Created = conn
            .post("/v1/tenants", op, &json!({"name": name}))
            .await?
            .json(StatusCode::CREATED)?;
        let keys = format!("/v1/tenants/{}/keys", tenant.id);
        let verify = json!({"scopes": ["verify"]});
        let manage = json!({"scopes": ["manage"]});
        Ok(Tenant {
            verify_key: new_key(&mut conn, op, &keys, &verify).await?,
            manage_key: new_key(&mut conn, op, &keys, &manage).await?,
            node_key: new_key(&mut conn, op, "/v1/node-keys", &json!({"name": "bench"})).await?,
            id: tenant.id,
        })
    }

    /// Start a data plane with its own new data directory.
    pub async fn start_data(&mut self, cpus: Option<String>) -> anyhow::Result<(Proc, PathBuf)> {
        self.started_data += 1;
        let dir = self.work.path().join(format!("data-{}", self.started_data));
        let proc = self
            .start_data_in(&dir, cpus, &format!("data-{}", self.started_data))
            .await?;
        Ok((proc, dir))
    }

    /// Start a data plane on `dir`, which may hold a replica from before.
    pub async fn start_data_in(
        &self,
        dir: &Path,
        cpus: Option<String>,
        name: &str,
    ) -> anyhow::Result<Proc> {
        // A data plane restarted with its control plane down still needs a URL.
        let control = self
            .control
            .as_ref()
            .map_or_else(|| "http://127.0.0.1:9".to_owned(), Proc::base);
        let mut envs = self.env();
        envs.push(("TWOFOLD_NODE_TOKEN".into(), self.tenant.node_key.clone()));
        let spec = Spawn {
            name: name.to_owned(),
            exe: self.options.twofold.clone(),
            args: vec![
                "data".into(),
                "--data-dir".into(),
                path_arg(dir),
                "--control-url".into(),
                control,
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            envs,
            cpus,
            idle: false,
            ready_prefix: "twofold data listening on http://".into(),
        };
        Proc::start(&spec).await
    }

    /// The control plane's head seq.
    pub async fn head(&self) -> anyhow::Result<u64> {
        head_of(&mut self.control_conn()?).await
    }

    /// Wait until every data plane is ready and has applied the control plane's
    /// head, and (with `drained`) has no usage events left to report.
    pub async fn wait_synced(
        &self,
        planes: &[&Proc],
        drained: bool,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + within;
        let mut conns: Vec<Conn> = planes.iter().map(|p| Conn::new(p.addr())).collect();
        let mut control = self.control_conn()?;
        loop {
            let head = head_of(&mut control).await?;
            let mut synced = true;
            for conn in &mut conns {
                let applied = data_applied(conn).await?;
                let empty = !drained || outbox_depth(conn).await? == Some(0);
                if applied.is_none_or(|a| a < head) || !empty {
                    synced = false;
                    break;
                }
            }
            // Draining reports makes new changes; look at the head once more.
            if synced && (!drained || head_of(&mut control).await? == head) {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!("data planes did not catch up with seq {head} within {within:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The head seq of the control plane on `conn`.
async fn head_of(conn: &mut Conn) -> anyhow::Result<u64> {
    let ready: ControlReady = conn.get("/readyz", None).await?.json(StatusCode::OK)?;
    Ok(ready.head_seq)
}

/// Create a key and return its secret.
pub async fn new_key(
    conn: &mut Conn,
    auth: Option<&HeaderValue>,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct NewKey {
        secret: String,
    }
    let key: NewKey = conn
        .post(path, auth, body)
        .await?
        .json(StatusCode::CREATED)?;
    Ok(key.secret)
}

/// A data plane's applied seq, or `None` while it is not ready.
pub async fn data_applied(conn: &mut Conn) -> anyhow::Result<Option<u64>> {
    let reply: Reply = conn.get("/readyz", None).await?;
    if reply.status == StatusCode::SERVICE_UNAVAILABLE {
        return Ok(None);
    }
    let ready: DataReady = reply.json(StatusCode::OK)?;
    Ok(Some(ready.applied_seq))
}

/// `twofold_data_outbox_depth` from a data plane's `/metrics`.
pub async fn outbox_depth(conn: &mut Conn) -> anyhow::Result<Option<u64>> {
    let reply = conn.get("/metrics", None).await?;
    let text = String::from_utf8_lossy(&reply.body);
    Ok(metric(&text, "twofold_data_outbox_depth"))
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_found_by_exact_name() {
        let text = "# HELP twofold_data_applied_seq x\n# TYPE twofold_data_applied_seq gauge\n\
                    twofold_data_applied_seq 42\ntwofold_data_applied_seq_total 7\n";
        assert_eq!(metric(text, "twofold_data_applied_seq"), Some(42));
        assert_eq!(metric(text, "twofold_data_head_seq"), None);
    }
}
