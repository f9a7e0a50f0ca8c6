//! Commands that talk to a running daemon over mTLS, as an admin (or, with `--as-agent`, as the
//! dev agent). Secrets are read from stdin or a file, never from arguments; nothing here opens
//! the store.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use credbroker::client::{self, ClientTls};
use tonic::transport::Channel;

use super::Error;

/// How client commands reach the daemon. Defaults to the `credbroker dev` certificates.
#[derive(Args)]
pub struct Remote {
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

/// The CA, certificate and key files a client presents.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    fn tls(&self) -> ClientTls<'_> {
        ClientTls {
            ca: &self.ca,
            cert: &self.cert,
            key: &self.key,
        }
    }
}

impl Remote {
    /// The TLS files to present: the options given, else the dev certificates.
    fn tls_files(&self) -> TlsFiles {
        let dev = Path::new("certs/dev");
        let who = if self.as_agent { "agent" } else { "admin" };
        TlsFiles {
            ca: self.ca.clone().unwrap_or_else(|| dev.join("ca.pem")),
            cert: self
                .cert
                .clone()
                .unwrap_or_else(|| dev.join(format!("{who}.pem"))),
            key: self
                .key
                .clone()
                .unwrap_or_else(|| dev.join(format!("{who}.key"))),
        }
    }

    async fn admin(&self) -> Result<AdminClient<Channel>, Error> {
        Ok(client::admin(&self.addr, &self.tls_files().tls()).await?)
    }

    async fn broker(&self) -> Result<BrokerClient<Channel>, Error> {
        Ok(client::broker(&self.addr, &self.tls_files().tls()).await?)
    }

    fn reference(&self, connector: &str, user: &str) -> Option<proto::ConnectionRef> {
        Some(proto::ConnectionRef {
            workspace: self.workspace.clone(),
            connector: connector.to_string(),
            user_id: user.to_string(),
        })
    }
}

#[derive(Args)]
pub struct ResolveArgs {
    connector: String,
    #[arg(long, default_value = "")]
    user: String,
    #[arg(long, default_value_t = 0)]
    min_ttl: u32,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    ApiKey,
    Oauth2,
    ImapSmtp,
    Caldav,
}

impl From<KindArg> for proto::ConnectorKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::ApiKey => proto::ConnectorKind::ApiKey,
            KindArg::Oauth2 => proto::ConnectorKind::Oauth2,
            KindArg::ImapSmtp => proto::ConnectorKind::ImapSmtp,
            KindArg::Caldav => proto::ConnectorKind::Caldav,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Shared,
    Personal,
}

impl From<ModeArg> for proto::ConnectorMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Shared => proto::ConnectorMode::Shared,
            ModeArg::Personal => proto::ConnectorMode::Personal,
        }
    }
}

#[derive(Subcommand)]
pub enum ConnectorCommand {
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
pub enum ConnectionCommand {
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

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub async fn resolve(remote: &Remote, args: ResolveArgs) -> Result<(), Error> {
    let req = proto::ResolveCredentialRequest {
        connection: remote.reference(&args.connector, &args.user),
        min_ttl_seconds: args.min_ttl,
    };
    let resp = remote.broker().await?.resolve_credential(req).await?;
    println!("{}", resp.into_inner().secret);
    Ok(())
}

pub async fn connector(remote: &Remote, cmd: ConnectorCommand) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    let workspace = remote.workspace.clone();
    let changed = match cmd {
        ConnectorCommand::Create {
            name,
            kind,
            mode,
            provider,
            config,
        } => {
            let req = proto::CreateConnectorRequest {
                workspace,
                name,
                kind: proto::ConnectorKind::from(kind) as i32,
                mode: proto::ConnectorMode::from(mode) as i32,
                provider,
                config: config.into_iter().collect(),
                secrets: HashMap::new(),
            };
            admin.create_connector(req).await?
        }
        ConnectorCommand::List => {
            let req = proto::ListConnectorsRequest { workspace };
            let resp = admin.list_connectors(req).await?.into_inner();
            resp.connectors.iter().for_each(print_connector);
            return Ok(());
        }
        ConnectorCommand::Get { connector } => {
            let req = proto::GetConnectorRequest {
                workspace,
                connector,
            };
            print_connector_config(&admin.get_connector(req).await?.into_inner());
            return Ok(());
        }
        ConnectorCommand::Set { connector, entries } => {
            let req = config_update(workspace, connector, entries);
            admin.update_connector(req).await?
        }
        ConnectorCommand::SetSecret {
            connector,
            slot,
            from_file,
        } => {
            let value = read_secret(from_file.as_deref())?;
            let req = secret_update(workspace, connector, slot, value);
            admin.update_connector(req).await?
        }
        ConnectorCommand::Rename {
            connector,
            new_name,
        } => {
            let req = proto::RenameConnectorRequest {
                workspace,
                connector,
                new_name,
            };
            admin.rename_connector(req).await?
        }
        ConnectorCommand::Delete { connector } => {
            let req = proto::DeleteConnectorRequest {
                workspace,
                connector,
            };
            let removed = admin.delete_connector(req).await?.into_inner();
            println!(
                "deleted, with {} connection(s)",
                removed.connections_removed
            );
            return Ok(());
        }
    };
    print_connector(&changed.into_inner());
    Ok(())
}

/// `connector set`: the entries given, each named in the mask; an empty value clears its key
/// (in the mask, absent from the config).
fn config_update(
    workspace: String,
    connector: String,
    entries: Vec<(String, String)>,
) -> proto::UpdateConnectorRequest {
    let paths = entries.iter().map(|(k, _)| format!("config.{k}")).collect();
    proto::UpdateConnectorRequest {
        workspace,
        connector,
        config: entries.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
        update_mask: Some(prost_types::FieldMask { paths }),
        ..Default::default()
    }
}

/// `connector set-secret`: one slot's new value, the only path in the mask.
fn secret_update(
    workspace: String,
    connector: String,
    slot: String,
    value: proto::SecretValue,
) -> proto::UpdateConnectorRequest {
    proto::UpdateConnectorRequest {
        workspace,
        connector,
        update_mask: Some(prost_types::FieldMask {
            paths: vec![format!("secrets.{slot}")],
        }),
        secrets: HashMap::from([(slot, value)]),
        ..Default::default()
    }
}

/// One connector and its configuration, a line per entry in key order.
fn print_connector_config(connector: &proto::Connector) {
    print_connector(connector);
    let mut config: Vec<_> = connector.config.iter().collect();
    config.sort();
    for (k, v) in config {
        println!("  {k} = {v}");
    }
}

pub async fn connection(remote: &Remote, cmd: ConnectionCommand) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    match cmd {
        ConnectionCommand::List { user } => {
            let req = proto::ListConnectionsRequest {
                workspace: remote.workspace.clone(),
                user_id: user,
            };
            for c in admin.list_connections(req).await?.into_inner().connections {
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
                connection: remote.reference(&connector, &user),
                settings: settings.into_iter().collect(),
                secrets: HashMap::from([(secret, value)]),
                save_on_failure: false,
            };
            let resp = admin.connect_with_credentials(req).await?.into_inner();
            for check in resp.test.iter().flat_map(|t| t.checks.iter()) {
                let outcome = if check.ok { "ok" } else { check.stage.as_str() };
                println!("{}\t{outcome}\t{}", check.name, check.message);
            }
            let saved = if resp.saved {
                "saved"
            } else {
                "not saved: the test failed"
            };
            println!("{saved}");
        }
        ConnectionCommand::Disconnect { connector, user } => {
            let req = proto::DisconnectRequest {
                connection: remote.reference(&connector, &user),
            };
            let resp = admin.disconnect(req).await?.into_inner();
            let revoked = if resp.revoked {
                " (revoked at the provider)"
            } else {
                ""
            };
            println!("disconnected{revoked}");
        }
    }
    Ok(())
}

pub async fn audit_tail(remote: &Remote, count: u64) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
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
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.seq, r.caller, r.operation, r.connector, r.user_id, r.outcome, r.reason, r.detail
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EventsTailArgs {
    /// Events after this cursor (0: every event the broker keeps).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Only these kinds (repeatable): connected, reconnected, refreshed, refresh_failed,
    /// expired, recovered, disconnected, connector_deleted, destination_changed.
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// Only this workspace's events (default: every workspace, which needs admin of "*").
    #[arg(long, default_value = "")]
    workspace: String,
    /// Keep following new events after the ones already recorded.
    #[arg(long)]
    follow: bool,
}

pub async fn events_tail(remote: &Remote, args: EventsTailArgs) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    let req = proto::WatchEventsRequest {
        after_cursor: args.after,
        kinds: args.kinds,
        workspace: args.workspace,
        backlog_only: !args.follow,
    };
    let mut stream = admin.watch_events(req).await?.into_inner();
    while let Some(e) = stream.message().await? {
        let time = e
            .time
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        println!(
            "{}\t{time}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            e.cursor, e.kind, e.workspace, e.connector, e.user_id, e.class, e.reason, e.id
        );
    }
    Ok(())
}

pub async fn audit_checkpoint(remote: &Remote) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    let head = admin
        .get_audit_head(proto::GetAuditHeadRequest {})
        .await?
        .into_inner();
    if head.checkpoint.is_empty() {
        return Err("no audit checkpoint yet (the log is empty, or the first is due)".into());
    }
    println!("{}", head.checkpoint);
    Ok(())
}

/// Streams a backup from the daemon, checks it whole, and writes it durably to `out`.
pub async fn backup(remote: &Remote, out: &Path) -> Result<(), Error> {
    if out.exists() {
        return Err(format!("{} exists; refusing to overwrite it", out.display()).into());
    }
    let mut admin = remote.admin().await?;
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
    credbroker::store::write_backup_file(out, &bytes)?;
    println!(
        "backup of store {store_id}: {records} records, {} bytes, in {}",
        bytes.len(),
        out.display()
    );
    Ok(())
}

pub async fn status(remote: &Remote) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    let status = admin.get_status(proto::GetStatusRequest {}).await?;
    print_status(&status.into_inner());
    Ok(())
}

pub async fn rotate_key(remote: &Remote) -> Result<(), Error> {
    let mut admin = remote.admin().await?;
    let status = admin
        .rotate_key(proto::RotateKeyRequest {})
        .await?
        .into_inner();
    println!(
        "rotated: new writes use key term {}; the rewrap runs in the background",
        status.current_term
    );
    print_status(&status);
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
        "audit: head {}, {} queued, node {}",
        status.audit_seq, status.audit_queue_depth, status.audit_node
    );
    println!(
        "audit checkpoint key (Ed25519): {}",
        status.audit_public_key
    );
}
