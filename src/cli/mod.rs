//! The command line: one clap tree, dispatched to [`local`] (a store folder or this machine) or
//! [`remote`] (a running daemon over mTLS). Every subcommand is handled exactly once; the two
//! that have both forms (`rotate-key`, `audit`) choose by their arguments.

mod local;
mod remote;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub type Error = Box<dyn std::error::Error>;

/// credbroker keeps an agent platform's third-party secrets in an encrypted store and serves
/// short-lived credentials, mail and calendar operations over mutual TLS.
#[derive(Parser)]
#[command(name = "credbroker", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    remote: remote::Remote,
    /// Log format of the daemon.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local broker: creates a store, key, dev PKI and policy on first run.
    Dev(local::DevArgs),
    /// Create a new store as the configuration's [store] section describes.
    Init(local::StoreArgs),
    /// Run the daemon.
    Serve(local::ServeArgs),
    /// Define and manage connectors (admin).
    #[command(subcommand)]
    Connector(remote::ConnectorCommand),
    /// See and manage connections (admin).
    #[command(subcommand)]
    Connection(remote::ConnectionCommand),
    /// Print the credential of a connection, as an agent would get it.
    Resolve(remote::ResolveArgs),
    /// Check, export or read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// See a running broker's lifecycle events (admin).
    #[command(subcommand)]
    Events(EventsCommand),
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
    ChangePassphrase(local::ChangePassphraseArgs),
    /// Recreate a store from a backup file into the configuration's (new, empty) store folder.
    Restore(local::RestoreArgs),
    /// Load-test a throwaway broker over mTLS against an Echo baseline (see BENCHMARKS.md).
    Bench(local::BenchArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the whole hash chain of a stopped store's audit log, and that it extends its
    /// latest signed checkpoint (and those in --checkpoint FILE, one JSON object a line).
    Verify(local::VerifyArgs),
    /// Write every record of a stopped store as JSON lines to stdout.
    Export(local::StoreArgs),
    /// Move the records of a store written before the audit log had files of its own into
    /// the log (daemon stopped).
    Migrate(local::StoreArgs),
    /// Show the latest records of a running broker.
    Tail {
        #[arg(long, default_value_t = 20)]
        count: u64,
    },
    /// Print a running broker's latest signed audit checkpoint (keep it elsewhere; `audit
    /// verify --checkpoint` later proves the log still extends it).
    Checkpoint,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print the events after a cursor, one a line (cursor, time, kind, workspace, connector,
    /// user, class, reason, id); with --follow, then each new one as it happens.
    Tail(remote::EventsTailArgs),
}

pub async fn run(cli: Cli) -> Result<(), Error> {
    let remote = &cli.remote;
    match cli.command {
        Command::Dev(args) => local::dev(args).await,
        Command::Init(args) => local::init(args).await,
        Command::Serve(args) => local::serve(args).await,
        Command::ChangePassphrase(args) => local::change_passphrase(args).await,
        Command::Restore(args) => local::restore(args).await,
        Command::Bench(args) => local::bench(args).await,
        Command::Audit(AuditCommand::Verify(args)) => local::audit_verify(args).await,
        Command::Audit(AuditCommand::Export(args)) => local::audit_export(args).await,
        Command::Audit(AuditCommand::Migrate(args)) => local::audit_migrate(args).await,
        Command::Audit(AuditCommand::Checkpoint) => remote::audit_checkpoint(remote).await,
        Command::RotateKey {
            config: Some(config),
            prompt,
        } => local::rotate_key(local::StoreArgs { config, prompt }).await,
        Command::RotateKey { config: None, .. } => remote::rotate_key(remote).await,
        Command::Audit(AuditCommand::Tail { count }) => remote::audit_tail(remote, count).await,
        Command::Connector(cmd) => remote::connector(remote, cmd).await,
        Command::Connection(cmd) => remote::connection(remote, cmd).await,
        Command::Resolve(args) => remote::resolve(remote, args).await,
        Command::Backup { out } => remote::backup(remote, &out).await,
        Command::Status => remote::status(remote).await,
        Command::Events(EventsCommand::Tail(args)) => remote::events_tail(remote, args).await,
    }
}

pub fn init_logging(format: LogFormat) {
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
