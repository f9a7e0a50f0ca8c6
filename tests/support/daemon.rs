//! Runs the real `credbroker` binary for integration tests: a fresh folder with a key file, a
//! store made by `credbroker init`, a test PKI, a policy and a configuration listening on free
//! loopback ports. Clients are always given the test CA explicitly.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use credbroker::client::{self, ClientTls};
use credbroker_devpki::broker::{LOOPBACK_EGRESS, LoopbackConfig};
use credbroker_devpki::{CertAuthority, ClientName};
use tonic::transport::Channel;

pub const ADMIN: &str = "spiffe://test/admin";
pub const AGENT: &str = "spiffe://test/agent";

/// A policy like the dev one: ADMIN administers everything, AGENT may do everything.
pub const OPEN_POLICY: &str =
    credbroker_devpki::open_policy!("spiffe://test/admin", "spiffe://test/agent");

/// The binary under test; `CREDBROKER_BIN` runs another build instead (e.g. an older one, to
/// see an attack succeed against it before the fix).
pub fn bin() -> String {
    std::env::var("CREDBROKER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_credbroker").into())
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub ca: CertAuthority,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    child: Option<Child>,
    /// Extra arguments of `credbroker serve` (e.g. `--log-format json`).
    serve_args: Vec<String>,
    /// The daemon's `RLIMIT_NOFILE`, when a test sets one ([`Daemon::limit_descriptors`]).
    nofile: Option<u64>,
}

/// Paths of one client identity's certificate and key.
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The OAuth callback URL must be known before the daemon starts, so its HTTP port is chosen
/// here: below the kernel's ephemeral range (where every port-0 bind lands, so no other test's
/// listener can take it between our check and the daemon's bind), in a window of this process.
fn http_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 120) as u16 * 100;
    for _ in 0..100 {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{base}..{}", base + 100);
}

/// Raises this test process's own soft descriptor limit to at least `n` (within its hard
/// limit, which needs no privilege), for tests that hold many client sockets themselves.
pub fn raise_own_nofile(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit(2) read and write only the rlimit struct passed.
    let ok = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_cur.max(n.min(limit.rlim_max));
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    assert!(
        ok && limit.rlim_cur >= n,
        "this test needs {n} descriptors; the hard limit is {} (raise it: ulimit -Hn)",
        limit.rlim_max
    );
}

/// The descriptor limit the shipped unit gives the daemon (`LimitNOFILE=`).
pub fn unit_nofile() -> u64 {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/credbroker.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let value = text.lines().find_map(|l| l.strip_prefix("LimitNOFILE="));
    value
        .expect("the unit sets LimitNOFILE")
        .trim()
        .parse()
        .unwrap()
}

/// The value of one series in a Prometheus text body (0 when absent: a counter that never
/// moved is not printed).
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(OPEN_POLICY, "")
    }

    /// Starts with [`OPEN_POLICY`] and extra configuration appended to the file.
    pub fn start_with_config(extra_config: &str) -> Daemon {
        Self::start_with(OPEN_POLICY, extra_config)
    }

    /// Starts with a policy and extra configuration appended to the file.
    pub fn start_with(policy: &str, extra_config: &str) -> Daemon {
        Self::start_with_args(policy, extra_config, &[])
    }

    /// As [`Daemon::start_with`], passing `serve_args` to `credbroker serve`.
    pub fn start_with_args(policy: &str, extra_config: &str, serve_args: &[&str]) -> Daemon {
        Self::start_full(policy, "", extra_config, serve_args)
    }

    /// Starts with [`OPEN_POLICY`] and `store_lines` added to the `[store]` table (another
    /// backend, say: TOML has each table once, so they cannot go in the extra configuration).
    pub fn start_with_store(store_lines: &str, extra_config: &str) -> Daemon {
        Self::start_full(OPEN_POLICY, store_lines, extra_config, &[])
    }

    fn start_full(
        policy: &str,
        store_lines: &str,
        extra_config: &str,
        serve_args: &[&str],
    ) -> Daemon {
        let mut daemon = Self::prepare(policy, extra_config, store_lines, serve_args);
        daemon.init_and_spawn();
        daemon
    }

    /// `n` replicas sharing one store: `store_lines` (`[store]` lines, e.g. a PostgreSQL
    /// server's) and the first replica's key file; each has its own folder, certificates,
    /// ports and audit log (`[audit] node = "replica-{i}"`). The first runs `credbroker init`.
    pub fn start_replicas(n: usize, store_lines: &str, extra_config: &str) -> Vec<Daemon> {
        let mut replicas: Vec<Daemon> = Vec::with_capacity(n);
        for i in 0..n {
            let extra = format!("{extra_config}\n[audit]\nnode = \"replica-{i}\"\n");
            let mut daemon = Self::prepare(OPEN_POLICY, &extra, store_lines, &[]);
            match replicas.first() {
                None => daemon.init_and_spawn(),
                Some(first) => {
                    std::fs::copy(first.path("store.key"), daemon.path("store.key"))
                        .expect("copy the key file");
                    daemon.spawn();
                }
            }
            replicas.push(daemon);
        }
        replicas
    }

    /// The folder, PKI, policy and configuration (`store_lines` added to `[store]`), nothing
    /// run yet.
    fn prepare(policy: &str, extra_config: &str, store_lines: &str, serve_args: &[&str]) -> Daemon {
        credbroker::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertAuthority::generate("credbroker test CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        write(&dir.path().join("ca.pem"), &ca.cert_pem);
        write(&dir.path().join("server.pem"), &server.cert_pem);
        write(&dir.path().join("server.key"), &server.key_pem);
        write(&dir.path().join("policy.toml"), policy);
        let loopback = LoopbackConfig {
            return_origins: &["https://console.example"],
            ..LoopbackConfig::beside(http_port())
        };
        let mut config = format!("{}{extra_config}\n", loopback.toml()).replacen(
            "[store]\n",
            &format!("[store]\n{store_lines}"),
            1,
        );
        // Small audit segments, so a test daemon does not zero-fill the default 32 MiB twice.
        if !extra_config.contains("[audit]") {
            config.push_str("[audit]\nsegment_bytes = 262144\n");
        }
        // A test that writes its own [egress] gets only that, not the loopback allowance.
        if extra_config.contains("[egress]") {
            config = config.replacen(LOOPBACK_EGRESS, "", 1);
        }
        // The background refresher would add refreshes to the tests that count them: off
        // unless a test writes its own [refresh] (tests/lifecycle_refresh.rs).
        if !extra_config.contains("[refresh]") {
            config.push_str("\n[refresh]\nahead = false\nkeepalive = false\n");
        }
        write(&dir.path().join("credbroker.toml"), &config);
        let daemon = Daemon {
            dir,
            ca,
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: None,
            child: None,
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            nofile: None,
        };
        daemon.issue(ADMIN, "admin");
        daemon.issue(AGENT, "agent");
        daemon
    }

    fn init_and_spawn(&mut self) {
        let init = self.cli(&["init", "--config", self.config().to_str().unwrap()]);
        assert!(
            init.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        self.spawn();
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn config(&self) -> PathBuf {
        self.path("credbroker.toml")
    }

    /// Issues a client certificate from the test CA naming `uri`, saved as `{name}.pem/.key`.
    pub fn issue(&self, uri: &str, name: &str) -> ClientFiles {
        let cert = self
            .ca
            .issue_client(
                &ClientName {
                    uri: Some(uri.into()),
                    dns: None,
                    common_name: name.into(),
                },
                time::Duration::days(1),
            )
            .unwrap();
        let files = ClientFiles {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        };
        write(&files.cert, &cert.cert_pem);
        write(&files.key, &cert.key_pem);
        files
    }

    pub fn files(&self, name: &str) -> ClientFiles {
        ClientFiles {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        }
    }

    /// The options that point the CLI at this daemon as the admin.
    pub fn admin_args(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            "--addr".into(),
            self.addr(),
            "--ca".into(),
            d.join("ca.pem").display().to_string(),
            "--cert".into(),
            d.join("admin.pem").display().to_string(),
            "--key".into(),
            d.join("admin.key").display().to_string(),
        ]
    }

    /// Runs the CLI with this daemon's folder as working directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run credbroker")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        let mut command = Command::new(bin());
        command
            .args(["serve", "--config", self.config().to_str().unwrap()])
            .args(&self.serve_args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit(2) is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("start credbroker serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("credbroker: listening ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "credbroker did not start; log:\n{}",
                    std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
                )
            });
        for part in ready.split_whitespace() {
            if let Some(addr) = part.strip_prefix("grpc=") {
                self.grpc = addr.parse().unwrap();
            } else if let Some(addr) = part.strip_prefix("http=").filter(|a| !a.is_empty()) {
                self.http = Some(addr.parse().unwrap());
            }
        }
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with a PID we own and a valid signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub fn hangup(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with a PID we own and a valid signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Restarts the daemon with at most `n` open descriptors (`RLIMIT_NOFILE`, as a unit's
    /// `LimitNOFILE=` sets it).
    pub fn limit_descriptors(&mut self, n: u64) {
        self.nofile = Some(n);
        self.restart();
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Restarts after a SIGKILL.
    pub fn respawn(&mut self) {
        self.spawn();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("https://{}", self.grpc)
    }

    pub async fn channel_as(&self, name: &str) -> Result<Channel, client::ClientError> {
        let files = self.files(name);
        let ca = self.path("ca.pem");
        client::channel(
            &self.addr(),
            &ClientTls {
                ca: &ca,
                cert: &files.cert,
                key: &files.key,
            },
        )
        .await
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel_as("admin").await.expect("admin channel"))
    }

    /// An HTTPS client for the HTTP listener, trusting the test CA only.
    pub fn https(&self) -> reqwest::Client {
        let ca = std::fs::read_to_string(self.path("ca.pem")).unwrap();
        credbroker::tls::unchecked_http_client(Some(&ca), Duration::from_secs(10)).unwrap()
    }

    /// `GET {http listener}{path}`: status and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let url = format!("https://{}{path}", self.http.expect("http listener"));
        let response = self.https().get(url).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub async fn agent(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel_as("agent").await.expect("agent channel"))
    }

    /// The daemon with an admin and an agent client, as most tests begin.
    pub async fn with_clients(self) -> (Daemon, AdminClient<Channel>, BrokerClient<Channel>) {
        let (admin, agent) = (self.admin().await, self.agent().await);
        (self, admin, agent)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out
}

/// The connection of `user` to `connector` in the default workspace (`user` empty for a shared
/// connector's one connection).
pub fn conn(connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: String::new(),
        connector: connector.into(),
        user_id: user.into(),
    })
}

/// CreateConnector of `name` in the default workspace, of `kind` and `mode`; settings, secrets
/// and the rest are added with struct update syntax.
pub fn new_connector(
    name: &str,
    kind: proto::ConnectorKind,
    mode: proto::ConnectorMode,
) -> proto::CreateConnectorRequest {
    proto::CreateConnectorRequest {
        name: name.into(),
        kind: kind as i32,
        mode: mode as i32,
        ..Default::default()
    }
}

/// Secret values by slot, as requests carry them.
pub fn secrets(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, proto::SecretValue> {
    pairs
        .iter()
        .map(|(slot, value)| {
            let value = value.to_string();
            (slot.to_string(), proto::SecretValue { value })
        })
        .collect()
}

/// Asserts that `status` has the code `code` and the ErrorInfo reason `want`.
pub fn assert_refused(status: &tonic::Status, code: tonic::Code, want: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status).0, want, "{status:?}");
}

/// The connection's current record (GetConnection must succeed).
pub async fn get_connection(
    admin: &mut AdminClient<Channel>,
    connection: Option<proto::ConnectionRef>,
) -> proto::Connection {
    admin
        .get_connection(proto::GetConnectionRequest { connection })
        .await
        .expect("GetConnection")
        .into_inner()
}

/// The last 1000 audit records (QueryAudit must succeed).
pub async fn audit_records(admin: &mut AdminClient<Channel>) -> Vec<proto::AuditRecord> {
    admin
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("QueryAudit")
        .into_inner()
        .records
}

/// The ErrorInfo reason and metadata of a status, if it has one.
pub fn reason(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    details
        .error_info()
        .map(|i| (i.reason.clone(), i.metadata.clone()))
        .unwrap_or_default()
}

/// A TLS acceptor serving a certificate for 127.0.0.1 and localhost from `ca` (a test server of
/// its own CA: a fake provider, an attacker's server).
pub fn tls_acceptor(ca: &CertAuthority) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
    let certs = credbroker::tls::parse_pem_certs(&leaf.cert_pem).unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}
