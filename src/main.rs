//! The `credbroker` command: the daemon (`dev`, `init`, `serve`), offline store tools
//! (`audit verify|export`), and admin client commands that talk to a running daemon over mTLS.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use credbroker::api::proto;
use credbroker::client::{self, ClientTls};
use credbroker::config::Config;
use credbroker::store::Store;
use credbroker::vault::{KeySource, generate_key_file};
use secrecy::SecretString;

/// credbroker keeps an agent platform's third-party secrets in an encrypted store and serves
/// short-lived credentials, mail and calendar operations over mutual TLS.
#[derive(Parser)]
#[command(name = "credbroker", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    remote: Remote,
    /// Log format of the daemon.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// How client commands reach the daemon. Defaults to the `credbroker dev` certificates.
#[derive(Args)]
struct Remote {
    /// Address of the broker's gRPC listener.
    #[arg(
        long,
        global = true,
        env = "CREDBROKER_ADDR",
        default_value = "https://127.0.0.1:7443"
    )]
    addr: String,
    /// CA that signed the broker's certificate [default: certs/dev/ca.pem].
    #[arg(long, global = true, env = "CREDBROKER_CA")]
    ca: Option<PathBuf>,
    /// Client certificate [default: certs/dev/admin.pem, or agent.pem with --as-agent].
    #[arg(long, global = true, env = "CREDBROKER_CERT")]
    cert: Option<PathBuf>,
    /// Client private key [default: certs/dev/admin.key, or agent.key with --as-agent].
    #[arg(long, global = true, env = "CREDBROKER_KEY")]
    key: Option<PathBuf>,
    /// Use the dev agent certificate instead of the dev admin one.
    #[arg(long, global = true)]
    as_agent: bool,
    /// Workspace (tenant).
    #[arg(long, short = 'w', global = true, default_value = "default")]
    workspace: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local broker: creates a store, key, dev PKI and policy on first run.
    Dev {
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
    },
    /// Create a new store as the configuration's [store] section describes.
    Init {
        #[arg(long)]
        config: PathBuf,
        /// Ask for the passphrase on the terminal (twice).
        #[arg(long)]
        prompt: bool,
    },
    /// Run the daemon.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Ask for the passphrase on the terminal.
        #[arg(long)]
        prompt: bool,
    },
    /// Define and manage connectors (admin).
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// See and manage connections (admin).
    #[command(subcommand)]
    Connection(ConnectionCommand),
    /// Print the credential of a connection, as an agent would get it.
    Resolve {
        connector: String,
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long, default_value_t = 0)]
        min_ttl: u32,
    },
    /// Check, export or read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Save a consistent, still encrypted snapshot of a running broker's store (admin of "*").
    Backup {
        /// The backup file to create (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a running broker's key terms, rewrap progress and audit head (admin of "*").
    Status,
    /// Add a data-key term: new writes use it at once, a background rewrap moves older records
    /// onto it and then removes the older keys. Against a running broker (admin of "*"), or with
    /// --config against a stopped store (the rewrap then runs to the end before returning).
    RotateKey {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        prompt: bool,
    },
    /// Rewrap the keyring of a stopped store under a new passphrase or key file (one atomic
    /// header write; no record is re-encrypted). Then point the configuration at the new key.
    ChangePassphrase {
        #[arg(long)]
        config: PathBuf,
        /// Ask for the current passphrase on the terminal (else the configuration's key).
        #[arg(long)]
        prompt: bool,
        /// The new key file (created with 32 random bytes if missing).
        #[arg(long, conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// A file holding the new passphrase. Without either option, it is asked for twice.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Recreate a store from a backup file into the configuration's (new, empty) store folder.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// Ask for the passphrase on the terminal.
        #[arg(long)]
        prompt: bool,
    },
    /// Load-test a throwaway broker over mTLS against an Echo baseline (see BENCHMARKS.md).
    Bench {
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    ApiKey,
    Oauth2,
    ImapSmtp,
    Caldav,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Shared,
    Personal,
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// Create a connector.
    Create {
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        #[arg(long, value_enum, default_value = "shared")]
        mode: ModeArg,
        /// OAuth provider preset (google-mail, slack, hubspot…).
        #[arg(long, default_value = "")]
        provider: String,
        /// A configuration entry, KEY=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_pair)]
        config: Vec<(String, String)>,
    },
    /// List the workspace's connectors.
    List,
    /// Show one connector.
    Get {
        connector: String,
    },
    /// Set configuration entries (KEY=VALUE; an empty VALUE clears the key).
    Set {
        connector: String,
        #[arg(value_parser = parse_pair, required = true)]
        entries: Vec<(String, String)>,
    },
    /// Set a secret slot (api_key, client_secret) from stdin or a file; never from arguments.
    SetSecret {
        connector: String,
        slot: String,
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    Rename {
        connector: String,
        new_name: String,
    },
    /// Delete a connector and every connection under it.
    Delete {
        connector: String,
    },
}

#[derive(Subcommand)]
enum ConnectionCommand {
    /// One row per connector, with this user's status.
    List {
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Connect an account with credentials: settings as KEY=VALUE, the secret from stdin or a file.
    Connect {
        connector: String,
        #[arg(long, default_value = "")]
        user: String,
        /// Secret slot the input fills (api_key, password).
        #[arg(long)]
        secret: String,
        #[arg(long)]
        from_file: Option<PathBuf>,
        #[arg(long = "set", value_parser = parse_pair)]
        settings: Vec<(String, String)>,
    },
    /// Remove a connection's stored credentials.
    Disconnect {
        connector: String,
        #[arg(long, default_value = "")]
        user: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the whole hash chain of a stopped store.
    Verify {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        prompt: bool,
    },
    /// Write every record of a stopped store as JSON lines to stdout.
    Export {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        prompt: bool,
    },
    /// Show the latest records of a running broker.
    Tail {
        #[arg(long, default_value_t = 20)]
        count: u64,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    credbroker::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("credbroker: {:?}: {}", status.code(), status.message()),
                None => eprintln!("credbroker: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: escape codes in a journal or a file are noise,
    // and writing them was a visible part of every call's cost.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The key source a configuration names, or a passphrase from the terminal.
fn key_source(config: &Config, prompt: bool, confirm: bool) -> Result<KeySource, Error> {
    if !prompt {
        return Ok(config.store.key_source()?);
    }
    let phrase = rpassword::prompt_password("Passphrase: ")?;
    if confirm && rpassword::prompt_password("Again: ")? != phrase {
        return Err("the passphrases differ".into());
    }
    Ok(KeySource::Passphrase(SecretString::from(phrase)))
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Bench {
            seconds,
            in_flight,
            connections,
            rate_fraction,
            stored,
            soak,
        } => {
            let options = credbroker::bench::BenchOptions {
                seconds,
                in_flight,
                connections,
                rate_fraction,
                stored,
                dir: std::env::temp_dir().join(format!("credbroker-bench-{}", std::process::id())),
            };
            println!("{}", credbroker::bench::header());
            credbroker::bench::run(&options, |row| {
                println!("{}", credbroker::bench::format_row(row))
            })
            .await?;
            if let Some(seconds) = soak {
                let every = std::time::Duration::from_secs(10);
                let report = credbroker::bench::soak(
                    &options,
                    std::time::Duration::from_secs(seconds),
                    every,
                    |at, rss| println!("soak {:>5}s  rss {rss} KiB", at.as_secs()),
                )
                .await?;
                println!(
                    "soak: {} calls, {} errors; RSS max/min after the first minute: {:.3}",
                    report.calls,
                    report.errors,
                    report.growth_after_warmup(every)
                );
            }
            Ok(())
        }
        Command::Dev {
            dir,
            certs,
            port,
            http_port,
        } => {
            let config_path = credbroker::dev::prepare(&dir, &certs, port, http_port).await?;
            let config = Config::load(&config_path)?;
            let key = config.store.key_source()?;
            let certs = certs.clone();
            serve(config, key, move |bound| {
                println!("{}", credbroker::dev::walkthrough(bound.grpc, &certs))
            })
            .await
        }
        Command::Init { config, prompt } => {
            let config = Config::load(&config)?;
            let key = key_source(&config, prompt, true)?;
            if let KeySource::KeyFile(path) = &key
                && !path.exists()
            {
                generate_key_file(path)
                    .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
                println!(
                    "wrote a new key file {} (keep it safe: without it the store cannot be opened)",
                    path.display()
                );
            }
            drop(Store::create(&config.store, &key).await?);
            println!("created store {}", config.store.path.display());
            Ok(())
        }
        Command::Serve { config, prompt } => {
            let config = Config::load(&config)?;
            let key = key_source(&config, prompt, false)?;
            serve(config, key, |bound| {
                println!(
                    "credbroker: listening grpc={} http={}",
                    bound.grpc,
                    bound.http.map(|a| a.to_string()).unwrap_or_default()
                )
            })
            .await
        }
        Command::Audit(AuditCommand::Verify { config, prompt }) => {
            let config = Config::load(&config)?;
            let store = Store::open(&config.store, &key_source(&config, prompt, false)?).await?;
            let summary = credbroker::audit::verify(&store).await?;
            println!(
                "audit chain intact: {} records, head {}",
                summary.records, summary.head
            );
            Ok(())
        }
        Command::Audit(AuditCommand::Export { config, prompt }) => {
            let config = Config::load(&config)?;
            let store = Store::open(&config.store, &key_source(&config, prompt, false)?).await?;
            let mut out = std::io::stdout().lock();
            credbroker::audit::export(&store, &mut out).await?;
            Ok(())
        }
        Command::Restore {
            from,
            config,
            prompt,
        } => {
            let config = Config::load(&config)?;
            let key = key_source(&config, prompt, false)?;
            let bytes = std::fs::read(&from).map_err(|e| format!("{}: {e}", from.display()))?;
            let snapshot = credbroker::store::Snapshot::decode(&bytes)?;
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
        Command::RotateKey {
            config: Some(config),
            prompt,
        } => {
            let config = Config::load(&config)?;
            let store = Store::open(&config.store, &key_source(&config, prompt, false)?).await?;
            let term = store.rotate_key().await?;
            println!("rotated: new writes use key term {term}; rewrapping older records…");
            loop {
                match store.rewrap_step(config.limits.rewrap_batch).await? {
                    credbroker::store::RewrapStep::Progress(_) => {}
                    credbroker::store::RewrapStep::Finished(state) => {
                        println!(
                            "rewrap finished: {} records re-sealed, terms retired: {:?}",
                            state.rewrapped, state.retired
                        );
                        return Ok(());
                    }
                    credbroker::store::RewrapStep::Idle => return Ok(()),
                }
            }
        }
        Command::ChangePassphrase {
            config,
            prompt,
            new_key_file,
            new_passphrase_file,
        } => {
            let config = Config::load(&config)?;
            let old = key_source(&config, prompt, false)?;
            let new = match (new_key_file, new_passphrase_file) {
                (Some(path), _) => {
                    if !path.exists() {
                        generate_key_file(&path).map_err(|e| {
                            format!("cannot create key file {}: {e}", path.display())
                        })?;
                        println!("wrote a new key file {}", path.display());
                    }
                    KeySource::KeyFile(path)
                }
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    KeySource::Passphrase(SecretString::from(
                        text.trim_end_matches(['\n', '\r']).to_string(),
                    ))
                }
                (None, None) => {
                    let phrase = rpassword::prompt_password("New passphrase: ")?;
                    if rpassword::prompt_password("Again: ")? != phrase {
                        return Err("the passphrases differ".into());
                    }
                    KeySource::Passphrase(SecretString::from(phrase))
                }
            };
            credbroker::store::change_key(&config.store, &old, &new).await?;
            println!(
                "the store {} now opens with the new {} only; update [store] in the configuration before starting the daemon",
                config.store.path.display(),
                new.kind()
            );
            Ok(())
        }
        command => remote(command, &cli.remote).await,
    }
}

fn print_status(status: &proto::StoreStatus) {
    println!("store {}", status.store_id);
    println!(
        "key term {} (keyring holds {:?}), {} encryptions under it",
        status.current_term, status.terms, status.term_encryptions
    );
    match &status.rewrap {
        None => println!("rewrap: never rotated"),
        Some(r) if r.finished => println!(
            "rewrap: finished onto term {}: {} records re-sealed in {} pass(es), retired terms {:?}",
            r.to_term,
            r.rewrapped,
            r.pass + 1,
            r.retired
        ),
        Some(r) => println!(
            "rewrap: in progress onto term {}: pass {}, {} of ~{} records scanned, {} re-sealed",
            r.to_term,
            r.pass + 1,
            r.scanned,
            r.total,
            r.rewrapped
        ),
    }
    println!(
        "audit: head {}, {} queued",
        status.audit_seq, status.audit_queue_depth
    );
}

/// Streams a backup into `{out}.partial`, checks it, syncs it and renames it to `out`.
async fn backup(
    admin: &mut proto::admin_client::AdminClient<tonic::transport::Channel>,
    out: &Path,
) -> Result<(), Error> {
    use std::io::Write;
    if out.exists() {
        return Err(format!("{} exists; refusing to overwrite it", out.display()).into());
    }
    let partial = out.with_extension("partial");
    let mut stream = admin.backup(proto::BackupRequest {}).await?.into_inner();
    let mut bytes = Vec::new();
    let (mut records, mut store_id) = (0, String::new());
    while let Some(chunk) = stream.message().await? {
        if !chunk.store_id.is_empty() {
            (records, store_id) = (chunk.records, chunk.store_id);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    credbroker::store::Snapshot::decode(&bytes)?;
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, out)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(format!("{}: {e}", out.display()).into());
    }
    println!(
        "backup of store {store_id}: {records} records, {} bytes, in {}",
        bytes.len(),
        out.display()
    );
    Ok(())
}

async fn serve(
    config: Config,
    key: KeySource,
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

fn read_secret(from_file: Option<&Path>) -> Result<proto::SecretValue, Error> {
    let mut value = String::new();
    match from_file {
        Some(path) => {
            value = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => {
            std::io::stdin().read_to_string(&mut value)?;
        }
    }
    let value = value.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err("the secret is empty (pipe it on stdin or pass --from-file)".into());
    }
    Ok(proto::SecretValue { value })
}

fn reference(remote: &Remote, connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: remote.workspace.clone(),
        connector: connector.to_string(),
        user_id: user.to_string(),
    })
}

fn status_name(status: i32) -> &'static str {
    match proto::ConnectionStatus::try_from(status) {
        Ok(proto::ConnectionStatus::Connected) => "connected",
        Ok(proto::ConnectionStatus::Expired) => "expired",
        Ok(proto::ConnectionStatus::Error) => "error",
        _ => "not connected",
    }
}

fn date(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn print_connector(c: &proto::Connector) {
    let kind = proto::ConnectorKind::try_from(c.kind)
        .map(|k| k.as_str_name())
        .unwrap_or("?")
        .to_lowercase();
    let mode = proto::ConnectorMode::try_from(c.mode)
        .map(|m| m.as_str_name())
        .unwrap_or("?")
        .to_lowercase();
    println!(
        "{}\t{}\t{kind}\t{mode}\tsecrets set: [{}]",
        c.id,
        c.name,
        c.secrets_set.join(", ")
    );
}

async fn remote(command: Command, remote: &Remote) -> Result<(), Error> {
    let dev = Path::new("certs/dev");
    let who = if remote.as_agent { "agent" } else { "admin" };
    let ca = remote.ca.clone().unwrap_or_else(|| dev.join("ca.pem"));
    let cert = remote
        .cert
        .clone()
        .unwrap_or_else(|| dev.join(format!("{who}.pem")));
    let key = remote
        .key
        .clone()
        .unwrap_or_else(|| dev.join(format!("{who}.key")));
    let tls = ClientTls {
        ca: &ca,
        cert: &cert,
        key: &key,
    };
    let ws = remote.workspace.clone();
    match command {
        Command::Resolve {
            connector,
            user,
            min_ttl,
        } => {
            let mut broker = client::broker(&remote.addr, &tls).await?;
            let req = proto::ResolveCredentialRequest {
                connection: reference(remote, &connector, &user),
                min_ttl_seconds: min_ttl,
            };
            let resp = broker.resolve_credential(req).await?.into_inner();
            println!("{}", resp.secret);
            return Ok(());
        }
        Command::Connector(cmd) => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            match cmd {
                ConnectorCommand::Create {
                    name,
                    kind,
                    mode,
                    provider,
                    config,
                } => {
                    let kind = match kind {
                        KindArg::ApiKey => proto::ConnectorKind::ApiKey,
                        KindArg::Oauth2 => proto::ConnectorKind::Oauth2,
                        KindArg::ImapSmtp => proto::ConnectorKind::ImapSmtp,
                        KindArg::Caldav => proto::ConnectorKind::Caldav,
                    };
                    let mode = match mode {
                        ModeArg::Shared => proto::ConnectorMode::Shared,
                        ModeArg::Personal => proto::ConnectorMode::Personal,
                    };
                    let req = proto::CreateConnectorRequest {
                        workspace: ws,
                        name,
                        kind: kind as i32,
                        mode: mode as i32,
                        provider,
                        config: config.into_iter().collect(),
                        secrets: HashMap::new(),
                    };
                    print_connector(&admin.create_connector(req).await?.into_inner());
                }
                ConnectorCommand::List => {
                    let resp = admin
                        .list_connectors(proto::ListConnectorsRequest { workspace: ws })
                        .await?
                        .into_inner();
                    resp.connectors.iter().for_each(print_connector);
                }
                ConnectorCommand::Get { connector } => {
                    let c = admin
                        .get_connector(proto::GetConnectorRequest {
                            workspace: ws,
                            connector,
                        })
                        .await?
                        .into_inner();
                    print_connector(&c);
                    let mut config: Vec<_> = c.config.iter().collect();
                    config.sort();
                    for (k, v) in config {
                        println!("  {k} = {v}");
                    }
                }
                ConnectorCommand::Set { connector, entries } => {
                    let paths = entries.iter().map(|(k, _)| format!("config.{k}")).collect();
                    let config = entries.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                    let req = proto::UpdateConnectorRequest {
                        workspace: ws,
                        connector,
                        config,
                        update_mask: Some(prost_types::FieldMask { paths }),
                        ..Default::default()
                    };
                    print_connector(&admin.update_connector(req).await?.into_inner());
                }
                ConnectorCommand::SetSecret {
                    connector,
                    slot,
                    from_file,
                } => {
                    let secret = read_secret(from_file.as_deref())?;
                    let req = proto::UpdateConnectorRequest {
                        workspace: ws,
                        connector,
                        secrets: HashMap::from([(slot.clone(), secret)]),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec![format!("secrets.{slot}")],
                        }),
                        ..Default::default()
                    };
                    print_connector(&admin.update_connector(req).await?.into_inner());
                }
                ConnectorCommand::Rename {
                    connector,
                    new_name,
                } => {
                    let req = proto::RenameConnectorRequest {
                        workspace: ws,
                        connector,
                        new_name,
                    };
                    print_connector(&admin.rename_connector(req).await?.into_inner());
                }
                ConnectorCommand::Delete { connector } => {
                    let resp = admin
                        .delete_connector(proto::DeleteConnectorRequest {
                            workspace: ws,
                            connector,
                        })
                        .await?
                        .into_inner();
                    println!("deleted, with {} connection(s)", resp.connections_removed);
                }
            }
        }
        Command::Connection(cmd) => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            match cmd {
                ConnectionCommand::List { user } => {
                    let resp = admin
                        .list_connections(proto::ListConnectionsRequest {
                            workspace: ws,
                            user_id: user,
                        })
                        .await?
                        .into_inner();
                    for c in resp.connections {
                        println!(
                            "{}\t{}\t{}\t{}",
                            c.connector_name,
                            status_name(c.status),
                            c.account_label,
                            date(&c.connected_at)
                        );
                    }
                }
                ConnectionCommand::Connect {
                    connector,
                    user,
                    secret,
                    from_file,
                    settings,
                } => {
                    let value = read_secret(from_file.as_deref())?;
                    let req = proto::ConnectWithCredentialsRequest {
                        connection: reference(remote, &connector, &user),
                        settings: settings.into_iter().collect(),
                        secrets: HashMap::from([(secret, value)]),
                        save_on_failure: false,
                    };
                    let resp = admin.connect_with_credentials(req).await?.into_inner();
                    for check in resp.test.iter().flat_map(|t| t.checks.iter()) {
                        println!(
                            "{}\t{}\t{}",
                            check.name,
                            if check.ok { "ok" } else { check.stage.as_str() },
                            check.message
                        );
                    }
                    println!(
                        "{}",
                        if resp.saved {
                            "saved"
                        } else {
                            "not saved: the test failed"
                        }
                    );
                }
                ConnectionCommand::Disconnect { connector, user } => {
                    let req = proto::DisconnectRequest {
                        connection: reference(remote, &connector, &user),
                    };
                    let resp = admin.disconnect(req).await?.into_inner();
                    println!(
                        "disconnected{}",
                        if resp.revoked {
                            " (revoked at the provider)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Audit(AuditCommand::Tail { count }) => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            let head = admin
                .get_audit_head(proto::GetAuditHeadRequest {})
                .await?
                .into_inner();
            let req = proto::QueryAuditRequest {
                after_seq: head.seq.saturating_sub(count),
                limit: count.min(1000) as u32,
                ..Default::default()
            };
            for r in admin.query_audit(req).await?.into_inner().records {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    r.seq, r.caller, r.operation, r.connector, r.user_id, r.outcome, r.reason
                );
            }
        }
        Command::Backup { out } => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            backup(&mut admin, &out).await?;
        }
        Command::Status => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            let status = admin
                .get_status(proto::GetStatusRequest {})
                .await?
                .into_inner();
            print_status(&status);
        }
        Command::RotateKey { config: None, .. } => {
            let mut admin = client::admin(&remote.addr, &tls).await?;
            let status = admin
                .rotate_key(proto::RotateKeyRequest {})
                .await?
                .into_inner();
            println!(
                "rotated: new writes use key term {}; the rewrap runs in the background",
                status.current_term
            );
            print_status(&status);
        }
        Command::Dev { .. }
        | Command::Init { .. }
        | Command::Serve { .. }
        | Command::Audit(_)
        | Command::Restore { .. }
        | Command::RotateKey { .. }
        | Command::ChangePassphrase { .. }
        | Command::Bench { .. } => {
            unreachable!("handled locally")
        }
    }
    Ok(())
}
