//! The real test peers of DESIGN.md §4 — dovecot, postfix, Radicale and oidc-provider, all over
//! TLS on loopback — started by `tests/peers/up.sh` the first time a test needs them and shared
//! by every later test (they keep running; `tests/peers/down.sh target/peers` stops them).
//! A peer that is not installed fails the test with the command that installs it.
//!
//! The peers listen on ports up.sh finds free when it starts them and writes to `ports.env` in
//! their folder; every test process reads them from there ([`Peers::ports`]), so two checkouts
//! (two folders) run their suites side by side. Peers are reused only while their stamp matches
//! the kit, their processes are alive and their ports answer.

#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::wait;

/// OAuth access tokens live this long at the test server, so refresh is exercised in seconds.
pub const ACCESS_TTL_SECS: u64 = 5;
pub const OAUTH_CLIENT_ID: &str = "broker";
pub const OAUTH_CLIENT_SECRET: &str = "brokersecret";
/// Attempts at starting the peers: a port found free can be taken by another suite's peers
/// starting at the same moment.
const START_ATTEMPTS: usize = 3;
/// up.sh's exit status when something is not installed (no use trying again).
const NOT_INSTALLED: i32 = 3;

/// The ports the peers listen on (all on 127.0.0.1), as up.sh wrote them to `ports.env`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// IMAP over implicit TLS (dovecot).
    pub imaps: u16,
    /// IMAP with STARTTLS (dovecot).
    pub imap: u16,
    /// SMTP submission with STARTTLS (postfix).
    pub submission: u16,
    /// SMTP over implicit TLS (postfix).
    pub smtps: u16,
    /// CalDAV over HTTPS (Radicale).
    pub caldav: u16,
    /// The OAuth 2 / OpenID Connect server over HTTPS (oidc-provider).
    pub oauth: u16,
}

impl Ports {
    /// Reads `DIR/ports.env` (`NAME=port` lines); `None` when it is missing or incomplete.
    fn read(dir: &Path) -> Option<Ports> {
        let text = std::fs::read_to_string(dir.join("ports.env")).ok()?;
        let port = |name: &str| -> Option<u16> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))?
                .trim()
                .parse()
                .ok()
        };
        Some(Ports {
            imaps: port("IMAPS_PORT")?,
            imap: port("IMAP_PORT")?,
            submission: port("SUBMISSION_PORT")?,
            smtps: port("SMTPS_PORT")?,
            caldav: port("CALDAV_PORT")?,
            oauth: port("OAUTH_PORT")?,
        })
    }

    fn all(&self) -> [u16; 6] {
        [
            self.imaps,
            self.imap,
            self.submission,
            self.smtps,
            self.caldav,
            self.oauth,
        ]
    }
}

pub struct Peers {
    dir: PathBuf,
    ports: Ports,
    pub ca_pem: String,
}

/// The running peers, started if they are not up yet.
pub fn peers() -> &'static Peers {
    static PEERS: OnceLock<Peers> = OnceLock::new();
    PEERS.get_or_init(start)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

fn start() -> Peers {
    // CREDBROKER_PEERS_DIR lets several checkouts of the repository share one set of peers.
    let dir = std::env::var_os("CREDBROKER_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/peers"));
    std::fs::create_dir_all(&dir).expect("create target/peers");
    // Test binaries may start at the same time: one of them starts the peers, the others wait.
    let lock = File::create(dir.join(".lock")).expect("create the peers lock file");
    lock.lock().expect("lock target/peers");
    let ca = dir.join("pki/ca.pem");
    // Peers started from other scripts or settings are restarted, not reused.
    let stamp = dir.join(".stamp");
    let wanted = kit_stamp();
    let up = ca.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && running(&dir)
        && Ports::read(&dir).is_some_and(|p| p.all().into_iter().all(answers));
    if !up {
        let _ = std::fs::remove_file(&stamp);
        start_peers(&dir);
        std::fs::write(&stamp, &wanted).expect("write the peers stamp");
    }
    let ports = Ports::read(&dir).expect("up.sh wrote no complete ports.env");
    let ca_pem = std::fs::read_to_string(&ca).expect("read the peers CA");
    Peers { dir, ports, ca_pem }
}

/// Whether every peer process that up.sh started under `dir` is still alive (by its PID file):
/// ports that answer may be another suite's peers that took them after ours stopped.
fn running(dir: &Path) -> bool {
    [
        "dovecot/run/master.pid",
        "postfix/spool/pid/master.pid",
        "radicale/radicale.pid",
        "oauth/server.pid",
    ]
    .into_iter()
    .all(|file| {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    })
}

/// Stops whatever runs under `dir` and starts the peers on free ports (up.sh writes them to
/// `ports.env`); tries again when the start fails for another reason than a missing install.
fn start_peers(dir: &Path) {
    let mut failures = String::new();
    for attempt in 1..=START_ATTEMPTS {
        run_script("down.sh", dir);
        let out = Command::new("bash")
            .arg(repo().join("tests/peers/up.sh"))
            .arg(dir)
            .env("ACCESS_TTL", ACCESS_TTL_SECS.to_string())
            .output()
            .expect("run bash tests/peers/up.sh");
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        failures += &format!("attempt {attempt}: {}\n{stderr}\n", out.status);
        if out.status.code() == Some(NOT_INSTALLED) {
            break;
        }
    }
    run_script("down.sh", dir);
    panic!(
        "the test peers did not start (DESIGN.md §4).\n{failures}If something is missing, install it with: sudo bash tests/peers/install.sh"
    );
}

/// Identifies the kit's scripts and settings, so a change to them restarts the peers.
fn kit_stamp() -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for file in ["up.sh", "oauth-server.mjs"] {
        hash.update(
            std::fs::read(repo().join("tests/peers").join(file)).expect("read the peers kit"),
        );
    }
    format!("ttl={ACCESS_TTL_SECS} kit={}", hex::encode(hash.finalize()))
}

fn run_script(name: &str, dir: &Path) {
    let _ = Command::new("bash")
        .arg(repo().join("tests/peers").join(name))
        .arg(dir)
        .output();
}

/// Waits until `port` answers (`open`) or refuses connections.
async fn wait_port(port: u16, open: bool) {
    let changed = wait::until(Duration::from_secs(10), async || {
        (answers(port) == open).then_some(())
    })
    .await;
    assert!(
        changed.is_some(),
        "port {port} did not {}",
        if open { "open" } else { "close" }
    );
}

impl Peers {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports the peers listen on.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.pem")
    }

    pub fn oauth_issuer(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.oauth)
    }

    pub fn caldav_url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.ports.caldav)
    }

    /// An HTTP client that trusts only the peers' CA (the machine's own bundle is not theirs).
    pub fn http(&self) -> reqwest::Client {
        credbroker::tls::unchecked_http_client(Some(&self.ca_pem), Duration::from_secs(10))
            .expect("http client")
    }

    /// Successful grants at the OAuth server's token endpoint, by grant type, and revocations.
    pub async fn oauth_stats(&self) -> OAuthStats {
        let url = format!("{}/__stats", self.oauth_issuer());
        let body: serde_json::Value = self
            .http()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = |k: &str| body[k].as_u64().unwrap_or(0);
        OAuthStats {
            authorization_code: n("authorization_code"),
            refresh_token: n("refresh_token"),
            client_credentials: n("client_credentials"),
            revocation: n("revocation"),
            token_errors: n("token_errors"),
        }
    }

    fn dovecot_conf(&self) -> PathBuf {
        self.dir.join("dovecot/dovecot.conf")
    }

    pub async fn stop_dovecot(&self) {
        let status = Command::new("doveadm")
            .arg("-c")
            .arg(self.dovecot_conf())
            .arg("stop")
            .status()
            .unwrap();
        assert!(status.success(), "doveadm stop failed");
        wait_port(self.ports.imaps, false).await;
    }

    pub async fn start_dovecot(&self) {
        // The daemon outlives the test: it must not hold the test's stdout/stderr open (a
        // `cargo test | grep` would never end).
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(self.dovecot_conf())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "dovecot did not start again");
        wait_port(self.ports.imaps, true).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OAuthStats {
    pub authorization_code: u64,
    pub refresh_token: u64,
    pub client_credentials: u64,
    pub revocation: u64,
    pub token_errors: u64,
}
