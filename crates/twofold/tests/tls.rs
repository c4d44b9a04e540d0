//! TLS through real `twofold` processes: each plane serving HTTPS from a PEM
//! certificate and key made here with rcgen, a data plane replicating from an
//! HTTPS control plane only when it trusts the control plane's CA, and the
//! start-up errors of a half-given configuration. The connection limits are
//! tested in `twofold-serve` and on the control plane in-process, where their
//! timeouts can be made short.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use reqwest::StatusCode;

/// A CA, and a certificate for 127.0.0.1 and localhost it signed, written as
/// PEM files in their own directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write key");
        Pki {
            dir,
            ca_pem: ca.pem(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `--tls-cert CERT --tls-key KEY`.
    fn serve_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".to_owned(),
            self.arg("cert.pem"),
            "--tls-key".to_owned(),
            self.arg("key.pem"),
        ]
    }

    /// A test client that trusts only this CA.
    fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA");
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(WAIT)
            .pool_max_idle_per_host(0)
            .build()
            .expect("client")
    }
}

/// A control plane serving HTTPS with `pki`'s certificate, driven by a client
/// that trusts its CA.
async fn https_control(pki: &Pki) -> ControlPlane {
    let mut control = ControlPlane::start_with(new_master_key(), pki.serve_args()).await;
    assert!(control.base().starts_with("https://"), "{}", control.base());
    control.api.client = pki.client();
    control
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_answers_over_https() {
    let pki = Pki::new();
    let control = https_control(&pki).await;
    let reply = send(control.request(reqwest::Method::GET, "/healthz", None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    // Its API works over TLS, and plain HTTP on the same port gets no answer.
    let key = control.create_node_key().await;
    assert!(key.secret.starts_with("tfk_"));
    let plain = control.base().replacen("https://", "http://", 1);
    let answered = try_send(client().get(format!("{plain}/healthz"))).await;
    assert!(answered.is_none(), "plain HTTP was answered: {answered:?}");
    // A client that trusts another CA refuses the certificate.
    let stranger = Pki::new().client();
    assert!(
        try_send(stranger.get(control.url("/healthz")))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_plane_replicates_over_https_from_a_control_plane_it_trusts() {
    let pki = Pki::new();
    let control = https_control(&pki).await;
    let tenant = control.tenant("Acme").await;
    control.enroll(&tenant.manage.secret, "alice").await;
    let node = control.create_node_key().await;

    let mut options = DataOptions::new(&control, &node.secret);
    options.extra_args = vec!["--control-ca".to_owned(), pki.arg("ca.pem")];
    // The data plane serves HTTPS too, with the same certificate.
    options.extra_args.extend(pki.serve_args());
    let mut data = DataPlane::start(options).await;
    assert!(data.base().starts_with("https://"), "{}", data.base());
    data.client = pki.client();
    data.wait_ready().await;
    data.wait_synced(&control.api).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_plane_refuses_a_control_plane_signed_by_another_ca() {
    let pki = Pki::new();
    let control = https_control(&pki).await;
    let node = control.create_node_key().await;

    let other = Pki::new();
    let mut options = DataOptions::new(&control, &node.secret);
    options.extra_args = vec!["--control-ca".to_owned(), other.arg("ca.pem")];
    let data = DataPlane::start(options).await;
    // It says why it cannot sync, and stays not ready.
    wait_for(
        "the data plane to log the refused certificate",
        WAIT,
        || {
            let logs = data.process.logs();
            async move {
                (logs.contains("sync interrupted") && logs.contains("certificate")).then_some(())
            }
        },
    )
    .await;
    assert_eq!(data.readyz().await, Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_plane_on_loopback_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let process = Process::start(
        "control",
        vec!["--data-dir".to_owned(), dir.path().display().to_string()],
        vec![
            ("TWOFOLD_MASTER_KEY".to_owned(), new_master_key()),
            ("TWOFOLD_OPERATOR_TOKEN".to_owned(), OPERATOR.to_owned()),
            ("TWOFOLD_LOG".to_owned(), "info".to_owned()),
        ],
        Port::Any,
    )
    .await;
    assert!(process.base().starts_with("http://"));
    wait_for("the plain-HTTP line", WAIT, || {
        let logs = process.logs();
        async move {
            logs.contains("serving plain HTTP on a loopback address")
                .then_some(())
        }
    })
    .await;
    assert!(!process.logs().contains("WARN"), "{}", process.logs());
}

/// Run `twofold <args>` to its end (it is expected to refuse to start) with
/// only `envs` among `TWOFOLD_*` variables; its exit success and stderr.
fn run_to_exit(args: &[&str], envs: &[(&str, &str)], data_dir: &Path) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twofold"));
    command
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg("127.0.0.1:0");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TWOFOLD_") {
            command.env_remove(&key);
        }
    }
    command
        .env("TWOFOLD_MASTER_KEY", new_master_key())
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    let output = command.output().expect("run twofold");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = pki.arg("cert.pem");
    let key = pki.arg("key.pem");
    let node = [
        "--control-url",
        "https://127.0.0.1:1",
        "--node-token",
        "tfn_x",
    ];
    // (arguments, environment, what the error says)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["control", "--tls-cert", &cert],
            vec![],
            "without its key",
        ),
        (
            vec!["control"],
            vec![("TWOFOLD_TLS_KEY", &key)],
            "without its certificate",
        ),
        (
            [&["data", "--tls-key", key.as_str()][..], &node[..]].concat(),
            vec![],
            "without its certificate",
        ),
        (
            [&["data"][..], &node[..]].concat(),
            vec![("TWOFOLD_TLS_CERT", &cert)],
            "without its key",
        ),
    ];
    for (args, envs, expected) in cases {
        let (ok, stderr) = run_to_exit(&args, &envs, dir.path());
        assert!(!ok, "{args:?} {envs:?} started");
        assert!(stderr.contains(expected), "{args:?} {envs:?}: {stderr}");
    }

    // The settings file's pair is used like the flags'.
    let file = dir.path().join("twofold.toml");
    std::fs::write(&file, format!("[control]\ntls_cert = {cert:?}\n")).expect("write settings");
    let file = file.display().to_string();
    let (ok, stderr) = run_to_exit(&["control", "--config", &file], &[], dir.path());
    assert!(!ok);
    assert!(stderr.contains("without its key"), "{stderr}");

    // A key that is not a key is named, never shown.
    let (ok, stderr) = run_to_exit(
        &["control", "--tls-cert", &cert, "--tls-key", &cert],
        &[],
        dir.path(),
    );
    assert!(!ok);
    assert!(stderr.contains("cannot set up TLS"), "{stderr}");
}
