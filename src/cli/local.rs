//! Commands that run on this machine: the daemon itself (`dev`, `serve`), and tools that open a
//! stopped store folder directly (`init`, `restore`, `rotate-key --config`, `change-passphrase`,
//! `audit verify|export`), plus the benchmark. Keys come from the configuration or a prompt,
//! never from arguments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use credbroker::config::Config;
use credbroker::store::{RewrapStep, Snapshot, Store};
use credbroker::vault::{KeySource, generate_key_file};
use secrecy::SecretString;

use super::Error;

#[derive(Args)]
pub struct DevArgs {
    /// Folder for the store, key, policy and configuration.
    #[arg(long, default_value = ".credbroker-dev")]
    dir: PathBuf,
    /// Folder for the dev CA and certificates.
    #[arg(long, default_value = "certs/dev")]
    certs: PathBuf,
    #[arg(long, default_value_t = 7443)]
    port: u16,
    #[arg(long, default_value_t = 7444)]
    http_port: u16,
}

/// A configuration file, and whether to ask for the store's passphrase instead of using its key.
#[derive(Args)]
pub struct StoreArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Ask for the passphrase on the terminal (twice when creating a store).
    #[arg(long)]
    pub prompt: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Checkpoints held elsewhere (a witness file, or `audit checkpoint`'s output): the log
    /// must extend every one of them.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The log folder of one replica (repeat for each): the logs are verified together, with
    /// the checkpoints, each against its own node.
    #[arg(long = "node-log")]
    node_logs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also serve the benchmark's do-nothing Echo service (for `credbroker bench`).
    #[arg(long, hide = true)]
    bench_echo: bool,
}

#[derive(Args)]
pub struct ChangePassphraseArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The new key file (created with 32 random bytes if missing).
    #[arg(long, conflicts_with = "new_passphrase_file")]
    new_key_file: Option<PathBuf>,
    /// A file holding the new passphrase. Without either option, it is asked for twice.
    #[arg(long)]
    new_passphrase_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct RestoreArgs {
    #[arg(long)]
    from: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Calls in flight for the peak measurements.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Client connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Open-loop rate as a fraction of Echo's peak.
    #[arg(long, default_value_t = 0.25)]
    rate_fraction: f64,
    /// Also resolve among 1,000 stored personal connections, then grow the store to this
    /// many and resolve among them all (the daemon restarts in between).
    #[arg(long, default_value_t = 0)]
    stored: u64,
    /// After the measurements, resolve for this many seconds on a fresh broker and report
    /// its memory (RSS) every 10 s.
    #[arg(long)]
    soak: Option<u64>,
    /// The throwaway broker's store engine: sled, or postgres (with --pg-url).
    #[arg(long, default_value = "sled", value_parser = ["sled", "postgres"])]
    backend: String,
    /// For --backend postgres: the server's connection string (the run uses a schema of
    /// its own, dropped at the end).
    #[arg(long)]
    pg_url: Option<String>,
    /// For --backend postgres: a file holding the role's password.
    #[arg(long)]
    pg_password_file: Option<PathBuf>,
    /// For --backend postgres: the CA of the server's certificate.
    #[arg(long)]
    pg_ca_file: Option<PathBuf>,
    /// For --backend postgres: also measure the peak over this many brokers on the one store
    /// (the connections spread over them).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

/// A passphrase typed at the terminal, asked twice when `confirm`.
fn prompt_passphrase(label: &str, confirm: bool) -> Result<KeySource, Error> {
    let phrase = rpassword::prompt_password(format!("{label}: "))?;
    if confirm && rpassword::prompt_password("Again: ")? != phrase {
        return Err("the passphrases differ".into());
    }
    Ok(KeySource::Passphrase(SecretString::from(phrase)))
}

/// Creates the key file at `path` (32 random bytes) unless it exists; true if it was created.
fn ensure_key_file(path: &Path) -> Result<bool, Error> {
    if path.exists() {
        return Ok(false);
    }
    generate_key_file(path)
        .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
    Ok(true)
}

/// The configuration, and the key that opens its store (from the prompt when asked).
fn load(args: &StoreArgs, confirm: bool) -> Result<(Config, KeySource), Error> {
    let config = Config::load(&args.config)?;
    let key = if args.prompt {
        prompt_passphrase("Passphrase", confirm)?
    } else {
        config.store.key_source()?
    };
    Ok((config, key))
}

async fn open(args: &StoreArgs) -> Result<(Config, Store), Error> {
    let (config, key) = load(args, false)?;
    let store = Store::open(&config.store, &key).await?;
    Ok((config, store))
}

pub async fn dev(args: DevArgs) -> Result<(), Error> {
    let config_path =
        crate::dev::prepare(&args.dir, &args.certs, args.port, args.http_port).await?;
    let config = Config::load(&config_path)?;
    let key = config.store.key_source()?;
    let certs = args.certs;
    let extra = tonic::service::Routes::default();
    run_daemon(config, key, extra, move |bound| {
        println!("{}", crate::dev::walkthrough(bound.grpc, &certs))
    })
    .await
}

pub async fn init(args: StoreArgs) -> Result<(), Error> {
    let (config, key) = load(&args, true)?;
    if let KeySource::KeyFile(path) = &key
        && ensure_key_file(path)?
    {
        println!(
            "wrote a new key file {} (keep it safe: without it the store cannot be opened)",
            path.display()
        );
    }
    drop(Store::create(&config.store, &key).await?);
    println!("created store {}", config.store.path.display());
    Ok(())
}

pub async fn serve(args: ServeArgs) -> Result<(), Error> {
    let (config, key) = load(&args.store, false)?;
    let extra = if args.bench_echo {
        crate::bench::echo_routes()
    } else {
        tonic::service::Routes::default()
    };
    run_daemon(config, key, extra, |bound| {
        println!(
            "credbroker: listening grpc={} http={}",
            bound.grpc,
            bound.http.map(|a| a.to_string()).unwrap_or_default()
        )
    })
    .await
}

pub async fn audit_verify(args: VerifyArgs) -> Result<(), Error> {
    let (config, store) = open(&args.store).await?;
    let checkpoints = match &args.checkpoint {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            credbroker::audit::Checkpoint::parse_lines(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    if !args.node_logs.is_empty() {
        let nodes = credbroker::audit::verify_nodes(&store, &args.node_logs, &checkpoints).await?;
        for node in &nodes {
            println!(
                "node {:?} ({}): audit chain intact: {} records, head {} (record {}); {} checkpoint(s) on the chain",
                node.node,
                node.dir.display(),
                node.summary.records,
                node.summary.head,
                node.summary.last,
                node.summary.checkpoints
            );
        }
        println!("{} node logs verified together", nodes.len());
        return Ok(());
    }
    let dir = config.audit.dir(&config.store);
    let summary = credbroker::audit::verify_against(&store, &dir, &checkpoints).await?;
    println!(
        "audit chain intact: {} records, head {} (record {}){}{}; {} checkpoint(s) on the chain",
        summary.records,
        summary.head,
        summary.last,
        if summary.pruned_through > 0 {
            format!(
                ", continuing from the signed prune anchor at record {}",
                summary.pruned_through
            )
        } else {
            String::new()
        },
        if summary.torn_tail {
            ", and a torn unacknowledged write at the end (cut when the daemon starts)"
        } else {
            ""
        },
        summary.checkpoints
    );
    Ok(())
}

pub async fn audit_export(args: StoreArgs) -> Result<(), Error> {
    let (config, store) = open(&args).await?;
    let dir = config.audit.dir(&config.store);
    credbroker::audit::export(&store, &dir, &mut std::io::stdout().lock()).await?;
    Ok(())
}

pub async fn audit_migrate(args: StoreArgs) -> Result<(), Error> {
    let (config, store) = open(&args).await?;
    let dir = config.audit.dir(&config.store);
    let moved = credbroker::audit::migrate(&store, &dir, config.audit.node.as_deref()).await?;
    println!("{moved} audit records moved into {}", dir.display());
    Ok(())
}

pub async fn restore(args: RestoreArgs) -> Result<(), Error> {
    let (config, key) = load(&args.store, false)?;
    let snapshot = Snapshot::read_file(&args.from)?;
    credbroker::store::restore(&config.store, &snapshot, &key).await?;
    let store = Store::open(&config.store, &key).await?;
    println!(
        "restored {} records of store {} into {}",
        snapshot.records.len(),
        store.header().store_id,
        config.store.path.display()
    );
    Ok(())
}

/// Rotates a stopped store's data key and runs the rewrap to its end.
pub async fn rotate_key(args: StoreArgs) -> Result<(), Error> {
    let (config, store) = open(&args).await?;
    let term = store.rotate_key().await?;
    println!("rotated: new writes use key term {term}; rewrapping older records…");
    loop {
        match store.rewrap_step(config.limits.rewrap_batch).await? {
            RewrapStep::Progress(_) => {}
            RewrapStep::Finished(state) => {
                println!(
                    "rewrap finished: {} records re-sealed, terms retired: {:?}",
                    state.rewrapped, state.retired
                );
                return Ok(());
            }
            RewrapStep::Idle => return Ok(()),
        }
    }
}

pub async fn change_passphrase(args: ChangePassphraseArgs) -> Result<(), Error> {
    let (config, old) = load(&args.store, false)?;
    let new = match (args.new_key_file, args.new_passphrase_file) {
        (Some(path), _) => {
            if ensure_key_file(&path)? {
                println!("wrote a new key file {}", path.display());
            }
            KeySource::KeyFile(path)
        }
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            KeySource::Passphrase(SecretString::from(
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
        (None, None) => prompt_passphrase("New passphrase", true)?,
    };
    credbroker::store::change_key(&config.store, &old, &new).await?;
    println!(
        "the store {} now opens with the new {} only; update [store] in the configuration before starting the daemon",
        config.store.path.display(),
        new.kind()
    );
    Ok(())
}

/// The PostgreSQL server of `--backend postgres`.
fn bench_postgres(args: &BenchArgs) -> Result<Option<crate::bench::PostgresTarget>, Error> {
    if args.backend != "postgres" {
        return Ok(None);
    }
    let url = args
        .pg_url
        .clone()
        .ok_or("--backend postgres needs --pg-url postgres://USER@HOST:PORT/DATABASE")?;
    Ok(Some(crate::bench::PostgresTarget {
        url: credbroker::store::PgUrl::new(url),
        password_file: args.pg_password_file.clone(),
        ca_file: args.pg_ca_file.clone(),
    }))
}

pub async fn bench(args: BenchArgs) -> Result<(), Error> {
    let options = crate::bench::BenchOptions {
        seconds: args.seconds,
        in_flight: args.in_flight,
        connections: args.connections,
        rate_fraction: args.rate_fraction,
        stored: args.stored,
        dir: std::env::temp_dir().join(format!("credbroker-bench-{}", std::process::id())),
        postgres: bench_postgres(&args)?,
        replicas: args.replicas,
    };
    if options.replicas > 1 && options.postgres.is_none() {
        return Err(
            "--replicas needs --backend postgres (replicas share a PostgreSQL store)".into(),
        );
    }
    println!("{}", crate::bench::header());
    let rows = crate::bench::run(&options, |row| {
        println!("{}", crate::bench::format_row(row))
    })
    .await?;
    for line in crate::bench::targets(&rows) {
        println!("{line}");
    }
    let Some(seconds) = args.soak else {
        return Ok(());
    };
    let every = Duration::from_secs(10);
    let report = crate::bench::soak(&options, Duration::from_secs(seconds), every, |at, rss| {
        println!("soak {:>5}s  rss {rss} KiB", at.as_secs())
    })
    .await?;
    println!(
        "soak: {} calls, {} errors; RSS max/min after the first minute: {:.3}",
        report.calls,
        report.errors,
        report.growth_after_warmup(every)
    );
    Ok(())
}

/// Serves until SIGINT or SIGTERM, then drains.
async fn run_daemon(
    config: Config,
    key: KeySource,
    extra: tonic::service::Routes,
    on_ready: impl FnOnce(credbroker::server::Bound),
) -> Result<(), Error> {
    credbroker::systemd::harden_process();
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    credbroker::server::run(
        config,
        key,
        extra,
        |bound| {
            on_ready(bound);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
        shutdown,
    )
    .await?;
    Ok(())
}
