//! The real test peers of DESIGN.md §4 — dovecot, postfix, Radicale and oidc-provider, all over
//! TLS on loopback — started by `tests/peers/up.sh` the first time a test needs them and shared
//! by every later test (they keep running; `tests/peers/down.sh target/peers` stops them).
//! A peer that is not installed fails the test with the command that installs it.

#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub const IMAPS_PORT: u16 = 10993;
pub const IMAP_PORT: u16 = 10143;
pub const SUBMISSION_PORT: u16 = 10587;
pub const SMTPS_PORT: u16 = 10465;
pub const CALDAV_PORT: u16 = 15232;
pub const OAUTH_PORT: u16 = 14444;
/// OAuth access tokens live this long at the test server, so refresh is exercised in seconds.
pub const ACCESS_TTL_SECS: u64 = 5;
pub const OAUTH_CLIENT_ID: &str = "broker";
pub const OAUTH_CLIENT_SECRET: &str = "brokersecret";

pub struct Peers {
    dir: PathBuf,
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

fn all_ports() -> [u16; 6] {
    [
        IMAPS_PORT,
        IMAP_PORT,
        SUBMISSION_PORT,
        SMTPS_PORT,
        CALDAV_PORT,
        OAUTH_PORT,
    ]
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
        && all_ports().into_iter().all(answers);
    if !up {
        run_script("down.sh", &dir);
        let out = Command::new("bash")
            .arg(repo().join("tests/peers/up.sh"))
            .arg(&dir)
            .env("ACCESS_TTL", ACCESS_TTL_SECS.to_string())
            .output()
            .expect("run bash tests/peers/up.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the test peers did not start (DESIGN.md §4).\n{stderr}\nIf something is missing, install it with: sudo bash tests/peers/install.sh"
        );
        std::fs::write(&stamp, &wanted).expect("write the peers stamp");
    }
    let ca_pem = std::fs::read_to_string(&ca).expect("read the peers CA");
    Peers { dir, ca_pem }
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

fn wait_port(port: u16, open: bool) {
    for _ in 0..200 {
        if answers(port) == open {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "port {port} did not {}",
        if open { "open" } else { "close" }
    );
}

impl Peers {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.pem")
    }

    pub fn oauth_issuer(&self) -> String {
        format!("https://127.0.0.1:{OAUTH_PORT}")
    }

    pub fn caldav_url(&self) -> String {
        format!("https://127.0.0.1:{CALDAV_PORT}/")
    }

    /// An HTTP client that trusts only the peers' CA (the machine's own bundle is not theirs).
    pub fn http(&self) -> reqwest::Client {
        credbroker::tls::http_client(Some(&self.ca_pem), Duration::from_secs(10))
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

    pub fn stop_dovecot(&self) {
        let status = Command::new("doveadm")
            .arg("-c")
            .arg(self.dovecot_conf())
            .arg("stop")
            .status()
            .unwrap();
        assert!(status.success(), "doveadm stop failed");
        wait_port(IMAPS_PORT, false);
    }

    pub fn start_dovecot(&self) {
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(self.dovecot_conf())
            .status()
            .unwrap();
        assert!(status.success(), "dovecot did not start again");
        wait_port(IMAPS_PORT, true);
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
