//! The Admin service: connectors, connections and the audit log, for callers with admin rights
//! on the workspace. Each handler is one [`Services::handle`] or [`Services::handle_on`] call;
//! what a request means for the domain is worked out by the functions beside them.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, settings};
use super::proto::{self, admin_server::Admin};
use super::{ApiError, Call, Rpc, Services};
use crate::audit::{AuditEvent, AuditRecord, Outcome};
use crate::connect::Candidate;
use crate::model::{ConnectorPatch, FieldError, Kind, Moved, NewConnector, workspace_or_default};

pub struct AdminApi(pub Arc<Services>);

/// Most audit records one QueryAudit returns, and most it scans looking for matches.
const AUDIT_PAGE_MAX: u32 = 1000;
const AUDIT_SCAN_MAX: usize = 100_000;

/// The admin scope of the RPCs about the whole store: every workspace.
const ALL: &str = "*";

/// Bytes per BackupChunk: well under gRPC's default 4 MiB message limit.
const BACKUP_CHUNK: usize = 1 << 20;

pub type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::LifecycleEvent, Status>> + Send>,
>;

/// WatchEvents' query: its scope checked (every workspace needs admin rights on "*").
fn watch_query(
    s: &Services,
    call: &mut Call,
    r: proto::WatchEventsRequest,
) -> Result<crate::events::WatchQuery, ApiError> {
    let workspace = match r.workspace.is_empty() {
        true => None,
        false => Some(workspace_or_default("workspace", &r.workspace)?),
    };
    s.admin_of(call, workspace.as_deref().unwrap_or(ALL))?;
    let kinds = r
        .kinds
        .iter()
        .map(|k| crate::events::EventKind::parse("kinds", k))
        .collect::<Result<_, _>>()?;
    Ok(crate::events::WatchQuery {
        after: r.after_cursor,
        kinds,
        workspace,
        backlog_only: r.backlog_only,
    })
}

/// A lifecycle event as WatchEvents sends it.
fn lifecycle_event(e: crate::events::Event) -> proto::LifecycleEvent {
    proto::LifecycleEvent {
        id: e.id,
        cursor: e.cursor,
        time: Some(convert::timestamp(e.time)),
        kind: e.kind.name().to_string(),
        workspace: e.workspace,
        connector_id: e.connector_id,
        connector: e.connector,
        user_id: e.user_id,
        class: e.class,
        reason: e.reason,
    }
}

/// A WatchEvents stream's items.
fn event_stream(watch: crate::events::Watch) -> EventStream {
    Box::pin(futures::stream::unfold(watch, async |mut watch| {
        let item = match watch.next().await? {
            Ok(event) => Ok(lifecycle_event(event)),
            Err(e) => Err(Status::from(ApiError::from(e))),
        };
        Some((item, watch))
    }))
}

pub type BackupStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

fn candidate(
    settings_map: HashMap<String, String>,
    secrets: HashMap<String, proto::SecretValue>,
) -> Candidate {
    Candidate {
        settings: settings(settings_map),
        secrets: convert::secrets(secrets),
    }
}

/// The store's key and rewrap state, for GetStatus and RotateKey.
async fn store_status(s: &Services) -> Result<proto::StoreStatus, ApiError> {
    let rewrap = s.registry.rewrap_state().await?;
    let key = s.registry.key_status();
    let rewrap = rewrap.map(|r| proto::RewrapStatus {
        // The rewrap records itself finished just before the keyring drops the old terms
        // (so a crash between the two is resumed, not lost): to a reader it is finished
        // once both are visible, which is what a client waiting for retirement needs.
        finished: r.finished && key.terms.iter().all(|t| *t >= r.to_term),
        to_term: r.to_term,
        pass: r.pass,
        scanned: r.scanned,
        rewrapped: r.rewrapped,
        total: r.total,
        retired: r.retired,
        started_at: convert::opt_timestamp(r.started_at),
        finished_at: convert::opt_timestamp(r.finished_at),
    });
    Ok(proto::StoreStatus {
        store_id: key.store_id,
        current_term: key.current_term,
        terms: key.terms,
        term_encryptions: key.term_encryptions,
        rewrap,
        audit_seq: s.audit.head().seq,
        audit_queue_depth: s.audit.queue_depth() as u64,
        audit_public_key: s.audit.public_key()?,
        audit_node: s.audit.node().to_string(),
    })
}

/// A snapshot of the store, encoded and cut into chunks; the first names the store and counts
/// the records.
async fn backup(s: &Services) -> Result<BackupStream, ApiError> {
    let (bytes, records) = s.registry.backup().await?;
    let store_id = s.registry.key_status().store_id;
    let chunks: Vec<Result<proto::BackupChunk, Status>> = bytes
        .chunks(BACKUP_CHUNK)
        .enumerate()
        .map(|(i, data)| {
            Ok(proto::BackupChunk {
                data: data.to_vec(),
                records: if i == 0 { records as u64 } else { 0 },
                store_id: if i == 0 {
                    store_id.clone()
                } else {
                    String::new()
                },
            })
        })
        .collect();
    Ok(Box::pin(tokio_stream::iter(chunks)) as BackupStream)
}

fn new_connector(
    workspace: String,
    r: proto::CreateConnectorRequest,
) -> Result<NewConnector, FieldError> {
    let kind = convert::kind_from("kind", r.kind)?;
    let mode = convert::mode_from("mode", r.mode)?;
    if kind != Kind::Oauth2 && !r.provider.is_empty() {
        return Err(FieldError::new(
            "provider",
            "only OAuth connectors take a provider",
        ));
    }
    Ok(NewConnector {
        workspace,
        name: r.name,
        kind,
        mode,
        provider: r.provider,
        config: settings(r.config),
        secrets: convert::secrets(r.secrets),
    })
}

/// The fields an UpdateConnector's mask names, with their new values (absent: removed).
fn connector_patch(r: &mut proto::UpdateConnectorRequest) -> Result<ConnectorPatch, FieldError> {
    let paths = r.update_mask.take().map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(FieldError::new(
            "update_mask",
            "is required: name the fields to save (config.<key>, secrets.<slot>, mode)",
        ));
    }
    let mut patch = ConnectorPatch::default();
    for (i, path) in paths.iter().enumerate() {
        if let Some(key) = path.strip_prefix("config.") {
            patch.config.insert(key.to_string(), r.config.remove(key));
        } else if let Some(slot) = path.strip_prefix("secrets.") {
            patch.secrets.insert(
                slot.to_string(),
                r.secrets
                    .remove(slot)
                    .map(|v| crate::model::Secret::new(v.value)),
            );
        } else if path == "mode" {
            patch.mode = Some(convert::mode_from("mode", r.mode)?);
        } else {
            return Err(FieldError::new(
                format!("update_mask.paths[{i}]"),
                format!("{path:?} is not config.<key>, secrets.<slot> or mode"),
            ));
        }
    }
    Ok(patch)
}

/// Audits what an UpdateConnector erased because it moved where secrets go, under its own
/// operation `DestinationChanged` beside the call's record (same request id).
async fn audit_moved(s: &Services, call: &Call, moved: &Moved) -> Result<(), ApiError> {
    s.audit
        .record(AuditEvent {
            caller: call.caller.clone(),
            operation: "DestinationChanged".into(),
            workspace: call.workspace.clone(),
            connector: call.connector.clone(),
            user_id: String::new(),
            outcome: Some(Outcome::Ok),
            reason: moved.describe(),
            request_id: call.request_id.clone(),
            ..AuditEvent::default()
        })
        .await?;
    Ok(())
}

/// QueryAudit's scope: without a workspace, the whole log (for admins of every workspace).
fn audit_scope(workspace: &str) -> Result<String, FieldError> {
    if workspace.is_empty() {
        Ok(ALL.to_string())
    } else {
        workspace_or_default("workspace", workspace)
    }
}

fn audit_limit(limit: u32) -> Result<usize, FieldError> {
    match limit {
        0 => Ok(100),
        n if n <= AUDIT_PAGE_MAX => Ok(n as usize),
        n => Err(FieldError::new(
            "limit",
            format!("is {n}; at most {AUDIT_PAGE_MAX}"),
        )),
    }
}

/// Whether a record matches a QueryAudit's filters within `scope`.
fn audit_matches(r: &proto::QueryAuditRequest, scope: &str, rec: &AuditRecord) -> bool {
    let e = &rec.event;
    (r.caller.is_empty() || e.caller == r.caller)
        && (r.operation.is_empty() || e.operation == r.operation)
        && (scope == ALL || e.workspace == scope)
        && (r.connector.is_empty() || e.connector.contains(&r.connector))
        && (r.outcome.is_empty() || e.outcome.is_some_and(|o| o.name() == r.outcome))
}

fn audit_record(rec: AuditRecord) -> proto::AuditRecord {
    proto::AuditRecord {
        seq: rec.seq,
        time: Some(convert::timestamp(rec.time)),
        caller: rec.event.caller,
        operation: rec.event.operation,
        workspace: rec.event.workspace,
        connector: rec.event.connector,
        user_id: rec.event.user_id,
        outcome: rec
            .event
            .outcome
            .map(|o| o.name().to_string())
            .unwrap_or_default(),
        reason: rec.event.reason,
        request_id: rec.event.request_id,
        detail: rec.event.detail,
        hash: rec.hash,
        node: rec.node,
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    type BackupStream = BackupStream;
    type WatchEventsStream = EventStream;

    async fn rotate_key(
        &self,
        req: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::StoreStatus>, Status> {
        let s = &self.0;
        s.handle(Rpc::RotateKey, req, async |call, _| {
            s.admin_of(call, ALL)?;
            s.registry.rotate_key().await?;
            store_status(s).await
        })
        .await
    }

    async fn get_status(
        &self,
        req: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::StoreStatus>, Status> {
        let s = &self.0;
        s.handle(Rpc::GetStatus, req, async |call, _| {
            s.admin_of(call, ALL)?;
            store_status(s).await
        })
        .await
    }

    async fn backup(
        &self,
        req: Request<proto::BackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let s = &self.0;
        s.handle(Rpc::Backup, req, async |call, _| {
            s.admin_of(call, ALL)?;
            backup(s).await
        })
        .await
    }

    async fn create_connector(
        &self,
        req: Request<proto::CreateConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        s.handle(Rpc::CreateConnector, req, async |call, r| {
            call.connector = r.name.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let c = s
                .registry
                .create_connector(new_connector(workspace, r)?)
                .await?;
            call.on_connector(&c);
            s.through_of(call, &c).await?;
            Ok(convert::connector(&c))
        })
        .await
    }

    async fn get_connector(
        &self,
        req: Request<proto::GetConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        s.handle(Rpc::GetConnector, req, async |call, r| {
            call.connector = r.connector.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let c = s.registry.find_connector(&workspace, &r.connector).await?;
            Ok(convert::connector(&c))
        })
        .await
    }

    async fn list_connectors(
        &self,
        req: Request<proto::ListConnectorsRequest>,
    ) -> Result<Response<proto::ListConnectorsResponse>, Status> {
        let s = &self.0;
        s.handle(Rpc::ListConnectors, req, async |call, r| {
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let connectors = s.registry.list_connectors(&workspace).await?;
            Ok(proto::ListConnectorsResponse {
                connectors: connectors.iter().map(convert::connector).collect(),
            })
        })
        .await
    }

    async fn update_connector(
        &self,
        req: Request<proto::UpdateConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        s.handle(Rpc::UpdateConnector, req, async |call, mut r| {
            call.connector = r.connector.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let patch = connector_patch(&mut r)?;
            let (c, moved) = s
                .registry
                .update_connector(&workspace, &r.connector, patch)
                .await?;
            call.on_connector(&c);
            s.through_of(call, &c).await?;
            if c.destinations_at == Some(c.updated_at) {
                audit_moved(s, call, &moved).await?;
                let (kind, why) = (
                    crate::events::EventKind::DestinationChanged,
                    moved.describe(),
                );
                let detail = crate::events::Detail::new("destination_changed", &why);
                s.registry.events().emit(kind, &c, "", detail).await;
            }
            Ok(convert::connector(&c))
        })
        .await
    }

    async fn rename_connector(
        &self,
        req: Request<proto::RenameConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        s.handle(Rpc::RenameConnector, req, async |call, r| {
            call.connector = r.connector.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let c = s
                .registry
                .rename_connector(&workspace, &r.connector, &r.new_name)
                .await?;
            call.on_connector(&c);
            Ok(convert::connector(&c))
        })
        .await
    }

    async fn delete_connector(
        &self,
        req: Request<proto::DeleteConnectorRequest>,
    ) -> Result<Response<proto::DeleteConnectorResponse>, Status> {
        let s = &self.0;
        s.handle(Rpc::DeleteConnector, req, async |call, r| {
            call.connector = r.connector.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            let removed = s
                .registry
                .delete_connector(&workspace, &r.connector)
                .await?;
            Ok(proto::DeleteConnectorResponse {
                connections_removed: removed as u32,
            })
        })
        .await
    }

    async fn begin_connect(
        &self,
        req: Request<proto::BeginConnectRequest>,
    ) -> Result<Response<proto::BeginConnectResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::BeginConnect, req, async |_, target, r| {
            let started = s
                .oauth
                .begin(&target, &r.return_url, &r.scopes, &r.login_hint)
                .await?;
            Ok(proto::BeginConnectResponse {
                authorization_url: started.authorization_url,
                state: started.state,
                expires_at: Some(convert::timestamp(started.expires_at)),
            })
        })
        .await
    }

    async fn complete_connect(
        &self,
        req: Request<proto::CompleteConnectRequest>,
    ) -> Result<Response<proto::Connection>, Status> {
        let s = &self.0;
        s.handle(Rpc::CompleteConnect, req, async |call, r| {
            // The state names the connection; the caller must administer its workspace, and
            // is checked before the state is consumed (a stranger cannot burn the link).
            let pending = s
                .oauth
                .take_state_if(&r.state, |pending| {
                    call.connector = pending.connector_id.clone();
                    call.user_id = pending.user_id.clone();
                    s.admin_of(call, &pending.workspace)
                })
                .await?;
            // The platform hosts the redirect and binds the browser to its own session; it
            // passes the `iss` it received, if any.
            let iss = Some(r.iss.as_str()).filter(|i| !i.is_empty());
            let done = s.oauth.complete(pending, &r.code, iss).await?;
            call.on_connector(&done.connector);
            Ok(convert::connection(&done.connector, &done.connection))
        })
        .await
    }

    async fn connect_with_credentials(
        &self,
        req: Request<proto::ConnectWithCredentialsRequest>,
    ) -> Result<Response<proto::ConnectWithCredentialsResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::ConnectWithCredentials, req, async |_, target, r| {
            let offered = candidate(r.settings, r.secrets);
            let done = s
                .connect
                .connect_with_credentials(&target, offered, r.save_on_failure)
                .await?;
            Ok(proto::ConnectWithCredentialsResponse {
                connection: Some(convert::connection(&target.connector, &done.connection)),
                test: Some(convert::report(&done.report)),
                saved: done.saved,
            })
        })
        .await
    }

    async fn test_connection(
        &self,
        req: Request<proto::TestConnectionRequest>,
    ) -> Result<Response<proto::TestConnectionResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::TestConnection, req, async |_, target, r| {
            let offered = (!r.settings.is_empty() || !r.secrets.is_empty())
                .then(|| candidate(r.settings, r.secrets));
            let report = s.connect.test(&target, offered).await?;
            Ok(proto::TestConnectionResponse {
                test: Some(convert::report(&report)),
            })
        })
        .await
    }

    async fn disconnect(
        &self,
        req: Request<proto::DisconnectRequest>,
    ) -> Result<Response<proto::DisconnectResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::Disconnect, req, async |_, target, _| {
            let (connection, revoked) = if target.connector.kind == Kind::Oauth2 {
                s.oauth.disconnect(&target).await?
            } else {
                (s.connect.disconnect(&target).await?, false)
            };
            Ok(proto::DisconnectResponse {
                revoked,
                connection: Some(convert::connection(&target.connector, &connection)),
            })
        })
        .await
    }

    async fn get_connection(
        &self,
        req: Request<proto::GetConnectionRequest>,
    ) -> Result<Response<proto::Connection>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::GetConnection, req, async |_, target, _| {
            let mut connection = s
                .registry
                .connection(&target.connector, &target.connection_user)
                .await?
                .unwrap_or_else(|| {
                    crate::model::Connection::new(&target.connector.id, &target.connection_user)
                });
            connection.next_refresh_at = s.oauth.next_refresh_at(&connection);
            Ok(convert::connection(&target.connector, &connection))
        })
        .await
    }

    async fn list_connections(
        &self,
        req: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        let s = &self.0;
        s.handle(Rpc::ListConnections, req, async |call, r| {
            call.user_id = r.user_id.clone();
            let workspace = s.admin_workspace(call, "workspace", &r.workspace)?;
            crate::model::validate_user_id("user_id", &r.user_id)?;
            let keep = convert::status_filter(&r.statuses)?;
            let rows = s.connect.statuses(&workspace, &r.user_id).await?;
            Ok(proto::ListConnectionsResponse {
                connections: rows
                    .into_iter()
                    .filter(|(_, conn)| keep.is_empty() || keep.contains(&conn.status))
                    .map(|(c, mut conn)| {
                        conn.next_refresh_at = s.oauth.next_refresh_at(&conn);
                        convert::connection(&c, &conn)
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn query_audit(
        &self,
        req: Request<proto::QueryAuditRequest>,
    ) -> Result<Response<proto::QueryAuditResponse>, Status> {
        let s = &self.0;
        s.handle(Rpc::QueryAudit, req, async |call, r| {
            let scope = audit_scope(&r.workspace)?;
            s.admin_of(call, &scope)?;
            let limit = audit_limit(r.limit)?;
            let keep = |rec: &AuditRecord| audit_matches(&r, &scope, rec);
            let records = s
                .audit
                .query(r.after_seq, limit, AUDIT_SCAN_MAX, keep)
                .await?;
            Ok(proto::QueryAuditResponse {
                records: records.into_iter().map(audit_record).collect(),
            })
        })
        .await
    }

    async fn get_audit_head(
        &self,
        req: Request<proto::GetAuditHeadRequest>,
    ) -> Result<Response<proto::AuditHead>, Status> {
        let s = &self.0;
        s.handle(Rpc::GetAuditHead, req, async |call, _| {
            s.admin_of(call, ALL)?;
            let head = s.audit.head();
            Ok(proto::AuditHead {
                seq: head.seq,
                hash: head.hash,
                time: convert::opt_timestamp(head.time),
                node: s.audit.node().to_string(),
                checkpoint: s
                    .audit
                    .latest_checkpoint()
                    .map(|cp| cp.to_line())
                    .unwrap_or_default(),
            })
        })
        .await
    }

    async fn watch_events(
        &self,
        req: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let s = &self.0;
        s.handle(Rpc::WatchEvents, req, async |call, r| {
            let query = watch_query(s, call, r)?;
            Ok(event_stream(s.registry.events().watch(query).await?))
        })
        .await
    }
}
