//! `credbroker bench`: a load benchmark of the real daemon over mTLS, with its own baseline.
//!
//! It prepares a throwaway broker (dev PKI, store, policy) with an API-key connector and an
//! OAuth connection holding a cached token, starts `credbroker serve` as a child process with
//! the do-nothing Echo service beside the broker's (`--bench-echo`), and drives Echo and ResolveCredential with the same
//! client: closed loop (N in flight) for peak throughput, one call in flight for base latency,
//! open loop (a fixed rate, latency counted from each call's scheduled time) for tails, and new
//! mTLS connections per second. Every figure is also given as a ratio to Echo's, because the
//! machines this runs on are shared and noisy.
//!
//! `--backend postgres` keeps the broker's store in PostgreSQL instead of sled
//! ([`PostgresTarget`]), in a schema of the run's own, dropped at the end.

use std::future::Future;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use credbroker::api::proto::{self, broker_client::BrokerClient};
use credbroker::client::{ClientTls, channel};
use credbroker::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Kind, Mode, NewConnector, Registry, Secret,
};
use credbroker::store::Store;
use echo::{EchoMessage, echo_client::EchoClient, echo_server::Echo};

/// The baseline's contract (proto/credbroker/v1/bench.proto), compiled by this crate only.
pub mod echo {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("credbroker.v1");
}

/// The baseline service: answers with what it was sent.
pub struct EchoApi;

/// Echo as routes for `credbroker serve --bench-echo`: same listener, TLS and server as the
/// broker's own services.
pub fn echo_routes() -> tonic::service::Routes {
    tonic::service::Routes::new(echo::echo_server::EchoServer::new(EchoApi))
}

#[tonic::async_trait]
impl Echo for EchoApi {
    async fn echo(&self, request: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Dev(#[from] crate::dev::DevError),
    #[error(transparent)]
    Store(#[from] credbroker::store::StoreError),
    #[error(transparent)]
    Model(#[from] credbroker::model::ModelError),
    #[error(transparent)]
    Client(#[from] credbroker::client::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the daemon did not start: {0}")]
    Daemon(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How long each measurement runs.
    pub seconds: u64,
    /// Calls in flight for the peak measurement.
    pub in_flight: usize,
    /// Connections they share.
    pub connections: usize,
    /// The open-loop rate, as a fraction of Echo's peak.
    pub rate_fraction: f64,
    /// Personal connections to grow the store to, from 1,000 (resolve picks among them); 0 for
    /// none.
    pub stored: u64,
    /// Where the throwaway broker lives (removed afterwards).
    pub dir: PathBuf,
    /// `--backend postgres`: the server; `None`: sled.
    pub postgres: Option<PostgresTarget>,
    /// `--replicas N` (with PostgreSQL): the peak rows again over N brokers on one store.
    pub replicas: usize,
}

/// The PostgreSQL server a `--backend postgres` run keeps its store in.
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub url: credbroker::store::PgUrl,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl PostgresTarget {
    /// The run's own schema.
    fn schema() -> String {
        format!("bench_{}", std::process::id())
    }

    /// `[store]` settings selecting this server, over the sled ones `credbroker dev` wrote.
    fn apply(&self, store: &mut credbroker::config::StoreConfig) {
        store.backend = "postgres".into();
        store.url = Some(self.url.clone());
        store.password_file = self.password_file.clone();
        store.ca_file = self.ca_file.clone();
        store.schema = Self::schema();
    }

    /// The same settings as `[store]` lines of the daemon's configuration file.
    fn toml_lines(&self, url: &str) -> String {
        let path = |name: &str, p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| format!("{name} = {:?}\n", p.display().to_string()))
                .unwrap_or_default()
        };
        format!(
            "backend = \"postgres\"\nurl = {url:?}\nschema = {:?}\n{}{}",
            Self::schema(),
            path("password_file", &self.password_file),
            path("ca_file", &self.ca_file)
        )
    }

    /// Drops the run's schema.
    async fn drop_schema(&self, config: &credbroker::config::Config) -> Result<(), BenchError> {
        let backend =
            credbroker::store::open_backend(&config.store, credbroker::store::Intent::Existing)
                .await?;
        let Some(pg) = backend
            .as_any()
            .downcast_ref::<credbroker::store::PgBackend>()
        else {
            return Ok(());
        };
        let sql = format!("DROP SCHEMA {} CASCADE", Self::schema());
        pg.run(move |s| async move { s.execute(&sql, &[]).await.map(drop) })
            .await?;
        Ok(())
    }
}

/// Latencies of one measurement.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub calls: u64,
    pub errors: u64,
    pub seconds: f64,
    latencies_us: Vec<u32>,
}

impl Stats {
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds.max(1e-9)
    }

    pub fn percentile_us(&self, p: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[rank.min(sorted.len() - 1)]
    }

    fn merge(mut self, other: Stats) -> Stats {
        self.calls += other.calls;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        self
    }
}

/// A running throwaway broker; killed and removed on drop.
struct Broker {
    child: Child,
    addr: String,
    certs: PathBuf,
    dir: PathBuf,
    config: credbroker::config::Config,
    config_path: PathBuf,
    /// The personal connector's id, and how many connections it has.
    personal: String,
    stored: u64,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const KEY_CONNECTOR: &str = "Bench Key";
const OAUTH_CONNECTOR: &str = "Bench OAuth";
const PERSONAL_CONNECTOR: &str = "Bench Personal";
/// Stored personal connections of the first store-size measurement; `--stored` grows it.
const STORED_BASE: u64 = 1000;

/// Makes the broker's store: the connectors the benchmark resolves, and `stored` personal
/// connections to show how resolve scales with the store's size. Returns the personal
/// connector's id.
async fn populate(config: &credbroker::config::Config, stored: u64) -> Result<String, BenchError> {
    let registry = Registry::new(
        std::sync::Arc::new(open_store(config).await?),
        &credbroker::driver::DRIVERS,
    );
    let connector =
        |name: &str, kind, mode, config: &[(&str, &str)], secrets: &[(&str, &str)]| NewConnector {
            workspace: String::new(),
            name: name.into(),
            kind,
            mode,
            provider: String::new(),
            config: credbroker::model::settings(config),
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
        };
    registry
        .create_connector(connector(
            KEY_CONNECTOR,
            Kind::ApiKey,
            Mode::Shared,
            &[],
            &[("api_key", "bench-key-0000")],
        ))
        .await?;
    let oauth = registry
        .create_connector(connector(
            OAUTH_CONNECTOR,
            Kind::Oauth2,
            Mode::Shared,
            &[
                ("client_id", "bench"),
                ("auth_url", "https://127.0.0.1:9/auth"),
                ("token_url", "https://127.0.0.1:9/token"),
            ],
            &[],
        ))
        .await?;
    // A cached token valid for a day: resolve serves it without asking any provider.
    let mut connection = Connection::new(&oauth.id, "");
    connection.status = ConnectionStatus::Connected;
    connection.account_label = "bench@example.com".into();
    connection.connected_at = Some(Utc::now());
    connection.access_expires_at = Some(Utc::now() + chrono::TimeDelta::days(1));
    let mut secrets = ConnectionSecrets::default();
    secrets
        .slots
        .insert("access_token".into(), Secret::new("bench-access-token"));
    registry
        .save_connection(&connection, Some(&secrets), None)
        .await?;

    let personal = registry
        .create_connector(connector(
            PERSONAL_CONNECTOR,
            Kind::ApiKey,
            Mode::Personal,
            &[],
            &[],
        ))
        .await?;
    add_users(&registry, &personal.id, 0, stored).await?;
    Ok(personal.id)
}

/// Stores personal connections `u{from}`..`u{to}` of the connector `personal`.
async fn add_users(
    registry: &Registry,
    personal: &str,
    from: u64,
    to: u64,
) -> Result<(), BenchError> {
    let mut user = from;
    while user < to {
        let mut batch = Vec::new();
        for _ in 0..1000.min(to - user) {
            let mut connection = Connection::new(personal, &format!("u{user}"));
            connection.status = ConnectionStatus::Connected;
            connection.connected_at = Some(Utc::now());
            let mut secrets = ConnectionSecrets::default();
            secrets
                .slots
                .insert("api_key".into(), Secret::new(format!("key-{user}")));
            batch.push((connection, secrets));
            user += 1;
        }
        registry.save_connections(&batch).await?;
    }
    Ok(())
}

async fn open_store(config: &credbroker::config::Config) -> Result<Store, BenchError> {
    let key = config
        .store
        .key_source()
        .map_err(|e| BenchError::Daemon(e.to_string()))?;
    Ok(Store::open(&config.store, &key).await?)
}

/// Prepares a throwaway broker's state (`stored` personal connections) and starts it.
async fn start(options: &BenchOptions, stored: u64) -> Result<Broker, BenchError> {
    let dir = options.dir.clone();
    let certs = dir.join("certs");
    let config_path = crate::dev::prepare(&dir.join("state"), &certs, 0, 0).await?;
    let mut text = std::fs::read_to_string(&config_path).map_err(io("read the bench config"))?;
    // The benchmark is one caller driving the daemon flat out: no per-caller rate limit.
    text.push_str("\n[limits]\ncaller_rate_per_sec = 0\nuser_rate_per_sec = 0\n");
    std::fs::write(&config_path, text).map_err(io("write the bench config"))?;
    let config = credbroker::config::Config::load(&config_path)
        .map_err(|e| BenchError::Daemon(e.to_string()))?;
    let config = match &options.postgres {
        Some(pg) => on_postgres(pg, config, &config_path).await?,
        None => config,
    };
    let personal = populate(&config, stored).await?;
    let (child, addr) = spawn_daemon(&dir, &config_path, &certs)?;
    Ok(Broker {
        addr,
        child,
        certs,
        dir,
        config,
        config_path,
        personal,
        stored,
    })
}

/// Moves the bench broker's store to `pg`: rewrites `[store]` in its configuration file and
/// creates the store there.
async fn on_postgres(
    pg: &PostgresTarget,
    mut config: credbroker::config::Config,
    config_path: &Path,
) -> Result<credbroker::config::Config, BenchError> {
    let text = std::fs::read_to_string(config_path).map_err(io("read the bench config"))?;
    let url = pg.url.expose();
    let text = text.replacen("[store]\n", &format!("[store]\n{}", pg.toml_lines(url)), 1);
    std::fs::write(config_path, text).map_err(io("write the bench config"))?;
    pg.apply(&mut config.store);
    let key = config
        .store
        .key_source()
        .map_err(|e| BenchError::Daemon(e.to_string()))?;
    drop(Store::create(&config.store, &key).await?);
    Ok(config)
}

/// Starts `credbroker serve` on `config_path`; returns it with its gRPC address.
fn spawn_daemon(
    dir: &Path,
    config_path: &Path,
    certs: &Path,
) -> Result<(Child, String), BenchError> {
    let exe = std::env::current_exe().map_err(io("find the credbroker binary"))?;
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .map_err(io("open the daemon log"))?;
    let mut child = Command::new(exe)
        .args(["serve", "--bench-echo", "--config"])
        .arg(config_path)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(io("start credbroker serve"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Daemon("no stdout".into()))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(io("read the daemon's first line"))?;
    let addr = line
        .split_whitespace()
        .find_map(|part| part.strip_prefix("grpc="))
        .ok_or_else(|| {
            BenchError::Daemon(format!(
                "unexpected first line {line:?}; see {}",
                dir.join("daemon.log").display()
            ))
        })?;
    if let Some(http) = line
        .split_whitespace()
        .find_map(|part| part.strip_prefix("http="))
    {
        // While it runs, the daemon's own view: sync latency, audit batch sizes, RPC timings.
        eprintln!(
            "bench: daemon metrics at https://{http}/metrics (CA {})",
            certs.join("ca.pem").display()
        );
    }
    Ok((child, format!("https://{addr}")))
}

impl Broker {
    /// Stops the daemon (it holds the store), adds personal connections up to `stored`, and
    /// starts it again on the same state.
    async fn grow_to(&mut self, stored: u64) -> Result<(), BenchError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let registry = Registry::new(
            std::sync::Arc::new(open_store(&self.config).await?),
            &credbroker::driver::DRIVERS,
        );
        add_users(&registry, &self.personal, self.stored, stored).await?;
        drop(registry);
        self.stored = stored;
        let (child, addr) = spawn_daemon(&self.dir, &self.config_path, &self.certs)?;
        (self.child, self.addr) = (child, addr);
        Ok(())
    }

    async fn channel(&self) -> Result<Channel, BenchError> {
        Ok(channel(&self.addr, &self.tls()).await?)
    }

    fn tls(&self) -> ClientTls<'static> {
        ClientTls {
            ca: leak(self.certs.join("ca.pem")),
            cert: leak(self.certs.join("agent.pem")),
            key: leak(self.certs.join("agent.key")),
        }
    }
}

/// The client TLS paths live as long as the benchmark; leaking three paths keeps `ClientTls`'s
/// borrowed shape without threading lifetimes through every task.
fn leak(path: PathBuf) -> &'static Path {
    Box::leak(path.into_boxed_path())
}

/// N tasks, each with one call in flight, for `duration`.
async fn closed_loop<F, Fut>(
    channels: &[Channel],
    in_flight: usize,
    duration: Duration,
    call: F,
) -> Stats
where
    F: Fn(Channel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send,
{
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..in_flight {
        let channel = channels[i % channels.len()].clone();
        let call = call.clone();
        tasks.spawn(async move {
            let mut stats = Stats::default();
            while Instant::now() < deadline {
                let started = Instant::now();
                match call(channel.clone()).await {
                    Ok(()) => {
                        stats.calls += 1;
                        stats
                            .latencies_us
                            .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Err(_) => stats.errors += 1,
                }
            }
            stats
        });
    }
    let started = Instant::now();
    let mut total = Stats::default();
    while let Some(Ok(stats)) = tasks.join_next().await {
        total = total.merge(stats);
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// Calls started at a fixed rate whatever the answers; latency counts from the scheduled time,
/// so a stall shows as the delay of every call queued behind it (no coordinated omission).
async fn open_loop<F, Fut>(channels: &[Channel], rate: f64, duration: Duration, call: F) -> Stats
where
    F: Fn(Channel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let channel = channels[i as usize % channels.len()].clone();
        let call = call.clone();
        tasks.spawn(async move {
            let ok = call(channel).await.is_ok();
            (ok, scheduled.elapsed())
        });
    }
    let mut stats = Stats::default();
    while let Some(Ok((ok, latency))) = tasks.join_next().await {
        if ok {
            stats.calls += 1;
            stats
                .latencies_us
                .push(latency.as_micros().min(u32::MAX as u128) as u32);
        } else {
            stats.errors += 1;
        }
    }
    stats.seconds = duration.as_secs_f64();
    stats
}

/// New mTLS connections per second: connect, one call, close — `parallel` at a time.
async fn new_connections<F, Fut>(
    broker: &Broker,
    parallel: usize,
    duration: Duration,
    call: F,
) -> Result<Stats, BenchError>
where
    F: Fn(Channel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send,
{
    let (addr, tls) = (broker.addr.clone(), broker.tls());
    let connect_and_call = move |_: Channel| {
        let (addr, tls, call) = (addr.clone(), tls.clone(), call.clone());
        async move {
            let fresh = channel(&addr, &tls)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            call(fresh).await
        }
    };
    // The shared channel handed to each task is not used: every call opens its own.
    let unused = [broker.channel().await?];
    Ok(closed_loop(&unused, parallel, duration, connect_and_call).await)
}

async fn echo(channel: Channel) -> Result<(), Status> {
    EchoClient::new(channel)
        .echo(EchoMessage {
            payload: vec![0; 16],
        })
        .await
        .map(drop)
}

fn resolve_call(
    connector: &'static str,
    users: u64,
) -> impl Fn(Channel) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>
+ Clone
+ Send
+ 'static {
    move |channel| {
        let user = if users > 0 {
            format!("u{}", rand::random_range(0..users))
        } else {
            String::new()
        };
        Box::pin(async move {
            let request = proto::ResolveCredentialRequest {
                connection: Some(proto::ConnectionRef {
                    workspace: String::new(),
                    connector: connector.into(),
                    user_id: user,
                }),
                min_ttl_seconds: 60,
                ..Default::default()
            };
            BrokerClient::new(channel)
                .resolve_credential(request)
                .await
                .map(drop)
        })
    }
}

/// One line of the report.
pub struct Row {
    pub scenario: String,
    pub stats: Stats,
    pub baseline: Option<Stats>,
}

/// The rows measured so far, each shown as soon as it is measured.
struct Report<'a> {
    rows: Vec<Row>,
    progress: &'a mut dyn FnMut(&Row),
}

impl Report<'_> {
    /// Adds a row and returns its figures, the baseline of the rows that follow.
    fn add(&mut self, scenario: String, stats: Stats, baseline: Option<&Stats>) -> Stats {
        let row = Row {
            scenario,
            stats: stats.clone(),
            baseline: baseline.cloned(),
        };
        (self.progress)(&row);
        self.rows.push(row);
        stats
    }
}

/// Runs every measurement and returns the report's rows.
pub async fn run(
    options: &BenchOptions,
    mut progress: impl FnMut(&Row),
) -> Result<Vec<Row>, BenchError> {
    let mut broker = start(options, options.stored.min(STORED_BASE)).await?;
    let duration = Duration::from_secs(options.seconds.max(1));
    let mut channels = Vec::new();
    for _ in 0..options.connections.max(1) {
        channels.push(broker.channel().await?);
    }
    let one = &channels[..1];
    let key = resolve_call(KEY_CONNECTOR, 0);
    let mut report = Report {
        rows: Vec::new(),
        progress: &mut progress,
    };
    // Warm-up: connections, caches, the group-commit thread.
    closed_loop(
        &channels,
        options.in_flight,
        Duration::from_secs(1),
        key.clone(),
    )
    .await;

    let peak = peak_rows(&mut report, &channels, options.in_flight, duration).await;
    let sync = fdatasync_probe(&options.dir, duration).await?;
    report.add(
        format!("fdatasync {PROBE_BYTES} B, preallocated"),
        sync,
        None,
    );
    if options.postgres.is_some() {
        let [commit, get] = postgres_probe(&broker.config, duration).await?;
        report.add(format!("postgres commit {PROBE_BYTES} B"), commit, None);
        report.add(format!("postgres get {PROBE_BYTES} B"), get, None);
    }
    let single = single_rows(&mut report, one, duration).await;
    let rate = (peak.rate() * options.rate_fraction).max(1.0);
    fixed_rate_rows(&mut report, &channels, rate, duration).await;

    let fresh = new_connections(&broker, 8, duration, echo).await?;
    let fresh = report.add("new mTLS connection + echo".into(), fresh, None);
    let stats = new_connections(&broker, 8, duration, key).await?;
    report.add("new mTLS connection + resolve".into(), stats, Some(&fresh));

    if options.stored > 0 {
        measure_stored(&mut broker, options, &one[0], &single, &mut report).await?;
    }
    if options.replicas > 1 {
        let replicas = Replicas::start(&broker, options.replicas)?;
        replica_rows(&mut report, &broker, &replicas, options, duration).await?;
    }
    if let Some(pg) = &options.postgres {
        let _ = broker.child.kill();
        let _ = broker.child.wait();
        pg.drop_schema(&broker.config).await?;
    }
    Ok(report.rows)
}

/// Echo, then both resolves, at `n` in flight on every channel; returns Echo's figures.
async fn peak_rows(
    report: &mut Report<'_>,
    channels: &[Channel],
    n: usize,
    duration: Duration,
) -> Stats {
    let peak = closed_loop(channels, n, duration, echo).await;
    let peak = report.add(format!("echo, {n} in flight"), peak, None);
    for (label, connector) in [
        ("api key", KEY_CONNECTOR),
        ("cached oauth", OAUTH_CONNECTOR),
    ] {
        let stats = closed_loop(channels, n, duration, resolve_call(connector, 0)).await;
        report.add(
            format!("resolve {label}, {n} in flight"),
            stats,
            Some(&peak),
        );
    }
    peak
}

/// `--replicas N`: N − 1 more `credbroker serve` on the broker's PostgreSQL store, each with
/// its own ports, audit folder and node id; stopped when dropped.
struct Replicas {
    children: Vec<Child>,
    addrs: Vec<String>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Replicas {
    fn start(broker: &Broker, n: usize) -> Result<Replicas, BenchError> {
        let text =
            std::fs::read_to_string(&broker.config_path).map_err(io("read the bench config"))?;
        let mut replicas = Replicas {
            children: Vec::new(),
            addrs: vec![broker.addr.clone()],
        };
        for i in 1..n {
            let path = broker.dir.join(format!("credbroker-replica-{i}.toml"));
            let audit = broker.dir.join(format!("audit-replica-{i}"));
            let own = format!(
                "{text}\n[audit]\npath = {:?}\nnode = \"bench-replica-{i}\"\n",
                audit.display().to_string()
            );
            std::fs::write(&path, own).map_err(io("write a replica's config"))?;
            let (child, addr) = spawn_daemon(&broker.dir, &path, &broker.certs)?;
            replicas.children.push(child);
            replicas.addrs.push(addr);
        }
        Ok(replicas)
    }
}

/// Echo and both resolves at the peak again, the connections spread over every replica.
async fn replica_rows(
    report: &mut Report<'_>,
    broker: &Broker,
    replicas: &Replicas,
    options: &BenchOptions,
    duration: Duration,
) -> Result<(), BenchError> {
    let mut channels = Vec::new();
    for addr in &replicas.addrs {
        for _ in 0..options.connections.max(1) {
            channels.push(channel(addr, &broker.tls()).await?);
        }
    }
    let (n, r) = (options.in_flight, replicas.addrs.len());
    let peak = closed_loop(&channels, n, duration, echo).await;
    let peak = report.add(format!("echo, {n} in flight, {r} replicas"), peak, None);
    for (label, connector) in [
        ("api key", KEY_CONNECTOR),
        ("cached oauth", OAUTH_CONNECTOR),
    ] {
        let stats = closed_loop(&channels, n, duration, resolve_call(connector, 0)).await;
        let row = format!("resolve {label}, {n} in flight, {r} replicas");
        report.add(row, stats, Some(&peak));
    }
    Ok(())
}

/// Echo, then both resolves, one call in flight on one channel; returns Echo's figures.
async fn single_rows(report: &mut Report<'_>, one: &[Channel], duration: Duration) -> Stats {
    let single = closed_loop(one, 1, duration, echo).await;
    let single = report.add("echo, 1 in flight".into(), single, None);
    for (label, connector) in [
        ("api key", KEY_CONNECTOR),
        ("cached oauth", OAUTH_CONNECTOR),
    ] {
        let stats = closed_loop(one, 1, duration, resolve_call(connector, 0)).await;
        report.add(
            format!("resolve {label}, 1 in flight"),
            stats,
            Some(&single),
        );
    }
    single
}

/// Echo, then both resolves, at a fixed arrival rate.
async fn fixed_rate_rows(
    report: &mut Report<'_>,
    channels: &[Channel],
    rate: f64,
    duration: Duration,
) {
    let open = open_loop(channels, rate, duration, echo).await;
    let open = report.add(format!("echo at {rate:.0}/s"), open, None);
    for (label, connector) in [
        ("api key", KEY_CONNECTOR),
        ("cached oauth", OAUTH_CONNECTOR),
    ] {
        let stats = open_loop(channels, rate, duration, resolve_call(connector, 0)).await;
        report.add(
            format!("resolve {label} at {rate:.0}/s"),
            stats,
            Some(&open),
        );
    }
}

/// Bytes each probe write appends: about one audit batch of one record.
const PROBE_BYTES: usize = 600;

/// One `write` + `fdatasync` of [`PROBE_BYTES`] at a time into a zero-filled, synced file in
/// `dir` (the store's disk), as the audit log appends: the physical floor of a durable call.
async fn fdatasync_probe(dir: &Path, duration: Duration) -> Result<Stats, BenchError> {
    let path = dir.join("fdatasync-probe");
    let work = move || -> std::io::Result<Stats> {
        use std::os::unix::fs::FileExt;
        let size = 64u64 << 20;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let zeros = vec![0u8; 1 << 20];
        for at in (0..size).step_by(zeros.len()) {
            file.write_all_at(&zeros, at)?;
        }
        file.sync_all()?;
        let record = vec![0x5au8; PROBE_BYTES];
        let (mut stats, started, mut at) = (Stats::default(), Instant::now(), 0u64);
        while started.elapsed() < duration && at + (PROBE_BYTES as u64) < size {
            let call = Instant::now();
            file.write_all_at(&record, at)?;
            file.sync_data()?;
            stats.latencies_us.push(call.elapsed().as_micros() as u32);
            stats.calls += 1;
            at += PROBE_BYTES as u64;
        }
        stats.seconds = started.elapsed().as_secs_f64();
        drop(file);
        std::fs::remove_file(&path)?;
        Ok(stats)
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BenchError::Daemon(format!("the fdatasync probe failed: {e}")))?
        .map_err(io("the fdatasync probe"))
}

/// `--backend postgres`: the store's own round trips, one at a time, from this process beside
/// the running daemon — a durable one-record `apply` (a commit) and a `get` — on a key of the
/// probe's own.
async fn postgres_probe(
    config: &credbroker::config::Config,
    duration: Duration,
) -> Result<[Stats; 2], BenchError> {
    let backend =
        credbroker::store::open_backend(&config.store, credbroker::store::Intent::Existing).await?;
    let key = b"bench-probe\0key".to_vec();
    let value = vec![0x5au8; PROBE_BYTES];
    let mut out = [Stats::default(), Stats::default()];
    for (i, stats) in out.iter_mut().enumerate() {
        let started = Instant::now();
        while started.elapsed() < duration {
            let call = Instant::now();
            if i == 0 {
                backend
                    .apply(vec![(key.clone(), Some(value.clone()))])
                    .await?;
                backend.sync().await?;
            } else {
                backend.get(&key).await?;
            }
            stats.latencies_us.push(call.elapsed().as_micros() as u32);
            stats.calls += 1;
        }
        stats.seconds = started.elapsed().as_secs_f64();
    }
    backend.apply(vec![(key, None)]).await?;
    Ok(out)
}

/// The issue-18 targets, each as met or missed, from one run's rows.
pub fn targets(rows: &[Row]) -> Vec<String> {
    let find = |prefix: &str| rows.iter().find(|r| r.scenario.starts_with(prefix));
    let mut out = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(r), Some(e)) = (find("resolve api key, "), find("echo, ")) {
        let ratio = r.stats.rate() / e.stats.rate().max(1e-9);
        out.push(format!(
            "target peak resolve >= 80% of echo: {:.0}% ({})",
            100.0 * ratio,
            verdict(ratio >= 0.8)
        ));
    }
    let sync = find("fdatasync").map(|r| r.stats.percentile_us(50.0) as f64);
    if let (Some(r), Some(e), Some(sync)) = (
        find("resolve api key, 1 in flight"),
        find("echo, 1 in flight"),
        sync,
    ) {
        let (p50, limit) = (
            r.stats.percentile_us(50.0) as f64,
            e.stats.percentile_us(50.0) as f64 + 1.5 * sync,
        );
        out.push(format!(
            "target 1-in-flight p50 <= echo p50 + 1.5 x fdatasync p50 ({sync:.0} µs): {p50:.0} <= {limit:.0} µs ({})",
            verdict(p50 <= limit)
        ));
    }
    for what in ["resolve api key at", "resolve cached oauth at"] {
        if let Some(r) = find(what)
            && let Some(b) = &r.baseline
        {
            let ratio = r.stats.percentile_us(99.0) as f64 / b.percentile_us(99.0).max(1) as f64;
            out.push(format!(
                "target p99 {what} 25% <= 2 x echo: x{ratio:.2} ({})",
                verdict(ratio <= 2.0)
            ));
        }
    }
    out
}

/// Last, because growing the store restarts the daemon: resolve among the first
/// `STORED_BASE` personal connections, then among all of them, each a random user per call.
async fn measure_stored(
    broker: &mut Broker,
    options: &BenchOptions,
    channel: &Channel,
    echo_one: &Stats,
    report: &mut Report<'_>,
) -> Result<(), BenchError> {
    let duration = Duration::from_secs(options.seconds.max(1));
    let base = broker.stored;
    let among_base = closed_loop(
        std::slice::from_ref(channel),
        1,
        duration,
        resolve_call(PERSONAL_CONNECTOR, base),
    )
    .await;
    let scenario = format!("resolve personal key among {base}, 1 in flight");
    let among_base = report.add(scenario, among_base, Some(echo_one));
    if options.stored <= base {
        return Ok(());
    }
    broker.grow_to(options.stored).await?;
    let one = [broker.channel().await?];
    // Warm the connection only: the store's caches start cold, as after any restart.
    closed_loop(&one, 1, Duration::from_secs(1), echo).await;
    let stored = options.stored;
    let among_all = closed_loop(&one, 1, duration, resolve_call(PERSONAL_CONNECTOR, stored)).await;
    let scenario = format!("resolve personal key among {stored}, 1 in flight");
    report.add(scenario, among_all, Some(&among_base));
    Ok(())
}

/// The report's header and one line per row, ratios to the row's baseline.
pub fn header() -> String {
    format!(
        "{:<44} {:>10} {:>8} {:>8} {:>9} {:>7} {:>16}",
        "scenario", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "errors", "vs echo"
    )
}

pub fn format_row(row: &Row) -> String {
    let s = &row.stats;
    let ratio = match &row.baseline {
        Some(b) => format!(
            "{:.0}% rate, p50 {:+}µs, p99 x{:.2}",
            100.0 * s.rate() / b.rate().max(1e-9),
            s.percentile_us(50.0) as i64 - b.percentile_us(50.0) as i64,
            s.percentile_us(99.0) as f64 / b.percentile_us(99.0).max(1) as f64
        ),
        None => "baseline".into(),
    };
    format!(
        "{:<44} {:>10.0} {:>8} {:>8} {:>9} {:>7}   {}",
        row.scenario,
        s.rate(),
        s.percentile_us(50.0),
        s.percentile_us(99.0),
        s.percentile_us(99.9),
        s.errors,
        ratio
    )
}

/// The daemon's resident memory, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory over a long run of resolves, sampled every `every`.
pub struct Soak {
    pub samples_kib: Vec<u64>,
    pub calls: u64,
    pub errors: u64,
}

impl Soak {
    /// Largest over smallest sample after the first minute (warm-up), as a ratio.
    pub fn growth_after_warmup(&self, every: Duration) -> f64 {
        let skip = (60 / every.as_secs().max(1)) as usize;
        let rest = self.samples_kib.get(skip..).unwrap_or_default();
        match (rest.iter().min(), rest.iter().max()) {
            (Some(&min), Some(&max)) if min > 0 => max as f64 / min as f64,
            _ => 1.0,
        }
    }
}

/// Resolves (API key and cached OAuth, alternately) with `in_flight` calls for `total`,
/// sampling the daemon's RSS every `every`.
pub async fn soak(
    options: &BenchOptions,
    total: Duration,
    every: Duration,
    mut progress: impl FnMut(Duration, u64),
) -> Result<Soak, BenchError> {
    let broker = start(options, 0).await?;
    let mut channels = Vec::new();
    for _ in 0..options.connections.max(1) {
        channels.push(broker.channel().await?);
    }
    let pid = broker.child.id();
    let mut soak = Soak {
        samples_kib: Vec::new(),
        calls: 0,
        errors: 0,
    };
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < total {
        let call = if round % 2 == 0 {
            resolve_call(KEY_CONNECTOR, 0)
        } else {
            resolve_call(OAUTH_CONNECTOR, 0)
        };
        let stats = closed_loop(&channels, options.in_flight, every, call).await;
        soak.calls += stats.calls;
        soak.errors += stats.errors;
        let rss = rss_kib(pid).unwrap_or(0);
        soak.samples_kib.push(rss);
        progress(started.elapsed(), rss);
        round += 1;
    }
    Ok(soak)
}
