//! `twofold up`: a control plane and one data plane in one process, on embedded
//! defaults, for a first try.
//!
//! The first run sets up a demo tenant with a `manage` key and a `verify` key and
//! a node key for the data plane, enrols a demo user, and prints the credentials
//! once with the next steps as `curl` lines and the QR code in the terminal. The
//! node key is kept sealed under the master key in `DATA_DIR/up.json`, so later
//! runs start both planes again with the same state.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use data_encoding::BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twofold_core::seal::{Binding, Keyring, Sealed};
use twofold_core::throttle::ThrottlePolicy;
use twofold_data::node::Node;

use crate::settings::{self, Common};
use crate::{keyfile, planes};

const SETUP_FILE: &str = "up.json";
const NODE_DIR: &str = "node";
const DEMO_USER: &str = "alice";
/// The node key is sealed like a TOTP secret, bound to this fixed owner.
const NODE_BINDING: Binding<'static> = Binding {
    tenant: "twofold-up",
    user: "node",
    factor: "token",
};
/// How long `up` waits for its own data plane to load the first snapshot.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What `up` keeps between runs.
#[derive(Debug, Serialize, Deserialize)]
struct SetupFile {
    tenant: String,
    node_key_id: String,
    /// The node key, sealed under the master key (base64).
    node_token: String,
}

/// Credentials made on the first run, shown once.
struct FirstRun {
    operator: String,
    tenant: String,
    manage: String,
    verify: String,
}

fn read_setup(path: &Path, keyring: &Keyring) -> anyhow::Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let setup: SetupFile =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    let sealed = BASE64
        .decode(setup.node_token.as_bytes())
        .ok()
        .and_then(|bytes| Sealed::from_bytes(&bytes).ok())
        .with_context(|| format!("{} holds a malformed node key", path.display()))?;
    let token = keyring.open(&sealed, &NODE_BINDING).with_context(|| {
        format!(
            "cannot open the node key in {}; was the master key changed?",
            path.display()
        )
    })?;
    Ok(Some(
        String::from_utf8(token.to_vec()).context("node key is not text")?,
    ))
}

fn write_setup(
    path: &Path,
    keyring: &Keyring,
    tenant: &str,
    node_key_id: &str,
    token: &str,
) -> anyhow::Result<()> {
    let sealed = keyring.seal(token.as_bytes(), &NODE_BINDING)?;
    let setup = SetupFile {
        tenant: tenant.to_owned(),
        node_key_id: node_key_id.to_owned(),
        node_token: BASE64.encode(sealed.as_bytes()),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(serde_json::to_string_pretty(&setup)?.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// A small client for `up`'s calls to its own control plane.
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn post(&self, path: &str, token: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "POST {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

fn field(value: &Value, name: &str) -> anyhow::Result<String> {
    value
        .get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("answer has no {name}"))
}

/// Create the demo tenant, its keys and the node key.
async fn first_run(
    api: &Api,
    operator: &str,
    keyring: &Keyring,
    path: &Path,
) -> anyhow::Result<(FirstRun, String)> {
    let tenant = field(
        &api.post("/v1/tenants", operator, json!({"name": "Demo"}))
            .await?,
        "id",
    )?;
    let keys = format!("/v1/tenants/{tenant}/keys");
    let manage = api
        .post(
            &keys,
            operator,
            json!({"name": "demo manage", "scopes": ["manage"]}),
        )
        .await?;
    let verify = api
        .post(
            &keys,
            operator,
            json!({"name": "demo verify", "scopes": ["verify"]}),
        )
        .await?;
    let node = api
        .post("/v1/node-keys", operator, json!({"name": "twofold up"}))
        .await?;
    let node_token = field(&node, "secret")?;
    write_setup(path, keyring, &tenant, &field(&node, "id")?, &node_token)?;
    Ok((
        FirstRun {
            operator: operator.to_owned(),
            tenant,
            manage: field(&manage, "secret")?,
            verify: field(&verify, "secret")?,
        },
        node_token,
    ))
}

async fn wait_ready(node: &Arc<Node>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while !node.sync.ready.load(Ordering::SeqCst) {
        if tokio::time::Instant::now() > deadline {
            bail!("the data plane did not load its first snapshot within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn curl(method: &str, url: &str, key: &str, body: &str) -> String {
    format!(
        "curl -s -X {method} {url} -H \"authorization: Bearer {key}\" -H 'content-type: application/json' -d '{body}'"
    )
}

/// Print the first run's credentials, the demo enrolment's QR code and the next
/// steps. Printed to stdout, never to the log.
fn print_first_run(
    run: &FirstRun,
    control: &str,
    data: &str,
    enrolled: &Value,
) -> anyhow::Result<()> {
    let factor = field(enrolled, "factor_id")?;
    let uri = field(enrolled, "otpauth_uri")?;
    let secret = field(enrolled, "secret")?;
    let qr = twofold_core::qr::terminal(&uri)?;
    let manage = &run.manage;
    let verify = &run.verify;
    println!(
        "
First run: these credentials are shown once. Only their hashes are stored.
  operator token  {operator}
  demo tenant     {tenant}
  manage key      {manage}   (control plane: enrol, list, delete)
  verify key      {verify}   (data plane: verify)

Next steps:

1. Enrol a user. Twofold has enrolled {DEMO_USER} for you with:
   {enrol}

2. Scan this QR code with an authenticator app (or type the secret {secret}):
{qr}
3. Activate the factor with the code the app shows (within 10 minutes):
   {activate}

4. Verify a later code on the data plane:
   {verify_line}
",
        operator = run.operator,
        tenant = run.tenant,
        enrol = curl(
            "POST",
            &format!("{control}/v1/users/{DEMO_USER}/totp"),
            manage,
            r#"{"issuer":"Twofold demo"}"#
        ),
        activate = curl(
            "POST",
            &format!("{control}/v1/users/{DEMO_USER}/totp/{factor}/activate"),
            manage,
            r#"{"code":"123456"}"#
        ),
        verify_line = curl(
            "POST",
            &format!("{data}/v1/verify"),
            verify,
            &format!(r#"{{"user":"{DEMO_USER}","code":"123456"}}"#)
        ),
    );
    Ok(())
}

/// Run both planes until Ctrl-C or SIGTERM.
pub async fn run(
    common: Common,
    control_listen: std::net::SocketAddr,
    data_listen: std::net::SocketAddr,
    operator_token: Option<String>,
    throttle: ThrottlePolicy,
) -> anyhow::Result<()> {
    let data_dir = &common.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let keyring = keyfile::load_keyring(data_dir, common.master_key_file.as_deref())?;
    let shutdown = CancellationToken::new();
    let control_settings = settings::Control {
        listen: control_listen,
        // `up` is the local first try: plain HTTP on loopback by default.
        tls: None,
        operator_token: operator_token.clone(),
        database: None,
        retain_changes: None,
        retain_age: None,
        compact_every: None,
    };
    let (state, generated) = tokio::task::block_in_place(|| {
        planes::control(
            data_dir,
            keyring.clone(),
            control_settings,
            throttle,
            shutdown.clone(),
        )
    })?;
    let control_listener = TcpListener::bind(control_listen)
        .await
        .with_context(|| format!("cannot listen on {control_listen}"))?;
    let data_listener = TcpListener::bind(data_listen)
        .await
        .with_context(|| format!("cannot listen on {data_listen}"))?;
    let control_url = format!("http://{}", control_listener.local_addr()?);
    let data_url = format!("http://{}", data_listener.local_addr()?);
    let control_task = tokio::spawn(twofold_control::serve(control_listener, state));

    let api = Api {
        client: reqwest::Client::new(),
        base: control_url.clone(),
    };
    let setup_path = data_dir.join(SETUP_FILE);
    let (first, node_token) = match read_setup(&setup_path, &keyring)? {
        Some(token) => (None, token),
        None => {
            let operator = generated
                .as_ref()
                .map(|t| t.to_string())
                .or(operator_token)
                .context(
                    "this data directory already has a control plane but no `twofold up` set-up; \
                     give its operator token in TWOFOLD_OPERATOR_TOKEN",
                )?;
            let (first, token) = first_run(&api, &operator, &keyring, &setup_path).await?;
            (Some(first), token)
        }
    };
    let data_settings = settings::Data {
        listen: data_listen,
        tls: None,
        control_ca: None,
        control_urls: vec![control_url.clone()],
        node_token: Some(node_token),
        strict_backup_codes: false,
        skew: twofold_core::otp::Skew::default(),
    };
    let (node, replica) = planes::data(
        &data_dir.join(NODE_DIR),
        keyring,
        data_settings,
        throttle,
        shutdown.clone(),
    )?;
    let data_task = tokio::spawn(twofold_data::server::serve(
        data_listener,
        node.clone(),
        replica,
    ));
    wait_ready(&node).await?;

    println!(
        "Twofold is up.\n  control plane  {control_url}\n  data plane     {data_url}\n  state          {}",
        data_dir.display()
    );
    match &first {
        Some(run) => {
            let enrolled = api
                .post(
                    &format!("/v1/users/{DEMO_USER}/totp"),
                    &run.manage,
                    json!({"issuer": "Twofold demo", "qr": "none"}),
                )
                .await?;
            print_first_run(run, &control_url, &data_url, &enrolled)?;
        }
        None => println!(
            "  (credentials were shown on the first run; see the README to start over)\n\nEnrol a user:\n  {}\n\nPress Ctrl-C to stop.",
            curl(
                "POST",
                &format!("{control_url}/v1/users/USER/totp"),
                "$MANAGE_KEY",
                "{}"
            )
        ),
    }
    crate::cancel_on_signal(shutdown);
    let (control, data) = tokio::join!(control_task, data_task);
    control??;
    data??;
    Ok(())
}
