//! The PostgreSQL test peer: a real server from Debian's `postgresql` package, `initdb`'d into
//! the peers' folder and listening on a free loopback port over TLS only, its certificate from
//! the peers' test CA. The broker connects as role `broker` (password auth, SCRAM) to database
//! `credbroker`; the role's password is random per instance and kept in a file, so tests can
//! check that it never shows ([`Postgres::password`]).
//!
//! [`postgres`] is one shared instance, started the first time a test needs it and reused by
//! later test processes (like the other peers); [`Postgres::private`] is one of a test's own,
//! which it may stop and start, stopped when dropped. A missing install fails the test with the
//! command that installs it.

#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::peers::peers;

pub const ROLE: &str = "broker";
pub const DATABASE: &str = "credbroker";

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// Stopped when dropped (a test's own instance).
    private: bool,
}

/// The shared instance, started (or reused) on first use.
pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        let dir = peers().dir().join("postgres");
        std::fs::create_dir_all(&dir).expect("create the postgres peer folder");
        let lock = File::create(dir.join(".lock")).expect("create the postgres lock file");
        lock.lock().expect("lock the postgres peer folder");
        Postgres::reuse(&dir).unwrap_or_else(|| Postgres::create(&dir, false))
    })
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`: Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, else wherever `PATH` has `pg_ctl`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("pg_ctl").exists() && dir.join("postgres").exists());
    on_path.unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (the tests run initdb, pg_ctl and postgres from \
             Debian's postgresql package). Install it with: sudo bash tests/peers/install.sh"
        )
    })
}

fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// A loopback port nothing listens on, in 10000-19999 like the other peers' (below the
/// ephemeral range).
fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 10_000 + (rand_u32() % 10_000) as u16;
        if !answers(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 10000-19999 for postgres");
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    getrandom(&mut bytes);
    u32::from_le_bytes(bytes)
}

fn getrandom(bytes: &mut [u8]) {
    use std::io::Read;
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes))
        .expect("read /dev/urandom");
}

/// Runs `program` (from PostgreSQL's bin folder) as the `postgres` user when this process is
/// root (the server refuses to run as root), and asserts that it succeeded.
fn run_pg(bin: &Path, program: &str, args: &[&str]) -> String {
    let out = pg_command(bin, program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {shown}");
    shown
}

/// `program` from PostgreSQL's bin folder, as the `postgres` user when this process is root.
fn pg_command(bin: &Path, program: &str) -> Command {
    let exe = bin.join(program);
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(exe);
        command
    } else {
        Command::new(exe)
    }
}

/// Hands `path` to the `postgres` user (when root), as the server wants for its files.
fn give_to_postgres(path: &Path) {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

impl Postgres {
    /// A test's own instance in `dir` (created empty), stopped when dropped.
    pub fn private(dir: &Path) -> Postgres {
        Self::create(dir, true)
    }

    /// The instance an earlier process left in `dir`, if it still runs and answers.
    fn reuse(dir: &Path) -> Option<Postgres> {
        let port = std::fs::read_to_string(dir.join("port"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let pid: u32 = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        let alive = Path::new(&format!("/proc/{pid}")).exists() && answers(port);
        alive.then(|| Postgres {
            dir: dir.to_path_buf(),
            bin: bin_dir(),
            port,
            private: false,
        })
    }

    fn create(dir: &Path, private: bool) -> Postgres {
        let bin = bin_dir();
        // Not stopped when dropped: only the instance that started is (when `private`).
        let pg = Postgres {
            dir: dir.to_path_buf(),
            bin,
            port: 0,
            private: false,
        };
        let _ = std::fs::remove_dir_all(pg.data());
        std::fs::create_dir_all(dir.join("sock")).expect("create the socket folder");
        let mut password = [0u8; 12];
        getrandom(&mut password);
        let password = format!("pg-canary-{}", hex::encode(password));
        std::fs::write(pg.password_file(), &password).expect("write the password file");
        give_to_postgres(dir);
        let data = pg.data();
        run_pg(
            &pg.bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let mut started = None;
        for _ in 0..3 {
            let port = free_port();
            pg.configure(port);
            let mut attempt = pg.clone_settings();
            attempt.port = port;
            if attempt.try_start() {
                attempt.create_role(&password);
                attempt.private = private;
                started = Some(attempt);
                break;
            }
        }
        let started = started.unwrap_or_else(|| panic!("postgres did not start: {}", pg.log()));
        std::fs::write(dir.join("port"), started.port.to_string()).expect("write the port");
        started
    }

    fn clone_settings(&self) -> Postgres {
        Postgres {
            dir: self.dir.clone(),
            bin: self.bin.clone(),
            port: self.port,
            private: self.private,
        }
    }

    /// TLS only, on 127.0.0.1:`port`, with the peers' certificate.
    fn configure(&self, port: u16) {
        let data = self.data();
        let pki = peers().dir().join("pki");
        std::fs::copy(pki.join("leaf-chain.pem"), data.join("server.crt")).expect("copy cert");
        std::fs::copy(pki.join("leaf.key"), data.join("server.key")).expect("copy key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod the key");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             max_connections = 300\nshared_buffers = 32MB\nsynchronous_commit = on\n\
             log_min_messages = warning\n",
            sock = self.dir.join("sock").display()
        );
        std::fs::write(data.join("postgresql.auto.conf"), conf)
            .expect("write postgresql.auto.conf");
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        give_to_postgres(&data);
    }

    fn try_start(&self) -> bool {
        // The server outlives the test: it must not hold the test's output open.
        pg_command(&self.bin, "pg_ctl")
            .args(["-D", self.data().to_str().unwrap(), "-l"])
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "30", "start"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn create_role(&self, password: &str) {
        let sock = self.dir.join("sock");
        let port = self.port.to_string();
        let sql = format!(
            "CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'; CREATE DATABASE {DATABASE} OWNER {ROLE};"
        );
        for statement in sql.split_inclusive(';') {
            run_pg(
                &self.bin,
                "psql",
                &[
                    "-h",
                    sock.to_str().unwrap(),
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-qc",
                    statement.trim(),
                ],
            );
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The broker role's password (random per instance: a canary for leaks).
    pub fn password(&self) -> String {
        std::fs::read_to_string(self.password_file()).expect("read the password file")
    }

    pub fn password_file(&self) -> PathBuf {
        self.dir.join("broker.password")
    }

    /// The broker's connection string, without the password (it is in [`Self::password_file`]).
    pub fn url(&self) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The CA that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        peers().ca_path()
    }

    /// `[store]` lines that select this server, with `schema`.
    pub fn store_toml(&self, schema: &str) -> String {
        format!(
            "backend = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nca_file = \"{}\"\nschema = \"{schema}\"\n",
            self.url(),
            self.password_file().display(),
            self.ca_file().display()
        )
    }

    /// Stops the server (fast shutdown: connections are closed, commits kept).
    pub fn stop(&self) {
        run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Freezes the server and every one of its processes (SIGSTOP), or thaws them (SIGCONT):
    /// connections then hang rather than fail.
    pub fn freeze(&self, frozen: bool) {
        let pid: u32 = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("read postmaster.pid")
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid in postmaster.pid");
        let mut pids = vec![pid];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid …: the parent is the second field after the comm.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent.and_then(|p| p.parse::<u32>().ok()) == Some(pid)
                && let Ok(child) = entry.file_name().to_string_lossy().parse()
            {
                pids.push(child);
            }
        }
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for pid in pids {
            // SAFETY: kill(2) on a process of this server, which this test started.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Starts it again on the same port.
    pub fn start(&self) {
        assert!(
            self.try_start(),
            "postgres did not start again: {}",
            self.log()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.private {
            let _ = pg_command(&self.bin, "pg_ctl")
                .args([
                    "-D",
                    self.data().to_str().unwrap(),
                    "-m",
                    "immediate",
                    "stop",
                ])
                .output();
        }
    }
}
