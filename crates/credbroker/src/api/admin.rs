//! The Admin service: connectors, connections and the audit log, for callers with admin rights
//! on the workspace.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, settings};
use super::proto::{self, admin_server::Admin};
use super::{ApiError, Call, Services};
use crate::connect::Candidate;
use crate::model::{ConnectorPatch, FieldError, Kind, NewConnector, Target, workspace_or_default};

pub struct AdminApi(pub Arc<Services>);

/// Most audit records one QueryAudit returns, and most it scans looking for matches.
const AUDIT_PAGE_MAX: u32 = 1000;
const AUDIT_SCAN_MAX: usize = 100_000;

impl AdminApi {
    /// Validates the connection reference, checks admin rights on its workspace, and resolves it.
    async fn admin_target(
        &self,
        call: &mut Call,
        connection: Option<proto::ConnectionRef>,
    ) -> Result<Target, ApiError> {
        let r = connection.ok_or_else(|| FieldError::new("connection", "is required"))?;
        let workspace = workspace_or_default("connection.workspace", &r.workspace)?;
        call.workspace = workspace.clone();
        call.connector = r.connector.clone();
        call.user_id = r.user_id.clone();
        self.0.authorize_admin(call, &workspace)?;
        let target = self
            .0
            .registry
            .target(&workspace, &r.connector, &r.user_id)
            .await?;
        call.on(&target);
        Ok(target)
    }

    fn admin_workspace(
        &self,
        call: &mut Call,
        field: &str,
        workspace: &str,
    ) -> Result<String, ApiError> {
        let workspace = workspace_or_default(field, workspace)?;
        call.workspace = workspace.clone();
        self.0.authorize_admin(call, &workspace)?;
        Ok(workspace)
    }
}

fn candidate(
    settings_map: std::collections::HashMap<String, String>,
    secrets: std::collections::HashMap<String, proto::SecretValue>,
) -> Candidate {
    Candidate {
        settings: settings(settings_map),
        secrets: convert::secrets(secrets),
    }
}

/// Bytes per BackupChunk: well under gRPC's default 4 MiB message limit.
const BACKUP_CHUNK: usize = 1 << 20;

pub type BackupStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

/// The store's key and rewrap state, for GetStatus and RotateKey.
async fn store_status(s: &Services) -> Result<proto::StoreStatus, ApiError> {
    let key = s.registry.key_status();
    let rewrap = s
        .registry
        .rewrap_state()
        .await?
        .map(|r| proto::RewrapStatus {
            finished: r.finished,
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
    })
}

#[tonic::async_trait]
impl Admin for AdminApi {
    type BackupStream = BackupStream;

    async fn rotate_key(
        &self,
        req: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::StoreStatus>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "RotateKey")?;
        let result = async {
            call.workspace = "*".into();
            s.authorize_admin(&call, "*")?;
            s.registry.rotate_key().await?;
            store_status(s).await
        }
        .await;
        s.finish(call, result).await
    }

    async fn get_status(
        &self,
        req: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::StoreStatus>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "GetStatus")?;
        let result = async {
            call.workspace = "*".into();
            s.authorize_admin(&call, "*")?;
            store_status(s).await
        }
        .await;
        s.finish(call, result).await
    }

    async fn backup(
        &self,
        req: Request<proto::BackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "Backup")?;
        let result = async {
            call.workspace = "*".into();
            s.authorize_admin(&call, "*")?;
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
        .await;
        s.finish(call, result).await
    }

    async fn create_connector(
        &self,
        req: Request<proto::CreateConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "CreateConnector")?;
        let r = req.into_inner();
        let result = async {
            call.connector = r.name.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            let kind = convert::kind_from("kind", r.kind)?;
            let mode = convert::mode_from("mode", r.mode)?;
            if kind != Kind::Oauth2 && !r.provider.is_empty() {
                return Err(
                    FieldError::new("provider", "only OAuth connectors take a provider").into(),
                );
            }
            let new = NewConnector {
                workspace,
                name: r.name,
                kind,
                mode,
                provider: r.provider,
                config: settings(r.config),
                secrets: convert::secrets(r.secrets),
            };
            let c = s.registry.create_connector(new).await?;
            call.connector = format!("{} ({})", c.name, c.id);
            Ok(convert::connector(&c))
        }
        .await;
        s.finish(call, result).await
    }

    async fn get_connector(
        &self,
        req: Request<proto::GetConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "GetConnector")?;
        let r = req.into_inner();
        let result = async {
            call.connector = r.connector.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            Ok(convert::connector(
                &s.registry.find_connector(&workspace, &r.connector).await?,
            ))
        }
        .await;
        s.finish(call, result).await
    }

    async fn list_connectors(
        &self,
        req: Request<proto::ListConnectorsRequest>,
    ) -> Result<Response<proto::ListConnectorsResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "ListConnectors")?;
        let r = req.into_inner();
        let result = async {
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            let connectors = s.registry.list_connectors(&workspace).await?;
            Ok(proto::ListConnectorsResponse {
                connectors: connectors.iter().map(convert::connector).collect(),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn update_connector(
        &self,
        req: Request<proto::UpdateConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "UpdateConnector")?;
        let mut r = req.into_inner();
        let result = async {
            call.connector = r.connector.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            let paths = r.update_mask.take().map(|m| m.paths).unwrap_or_default();
            if paths.is_empty() {
                return Err(FieldError::new(
                    "update_mask",
                    "is required: name the fields to save (config.<key>, secrets.<slot>, mode)",
                )
                .into());
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
                    )
                    .into());
                }
            }
            let c = s
                .registry
                .update_connector(&workspace, &r.connector, patch)
                .await?;
            call.connector = format!("{} ({})", c.name, c.id);
            Ok(convert::connector(&c))
        }
        .await;
        s.finish(call, result).await
    }

    async fn rename_connector(
        &self,
        req: Request<proto::RenameConnectorRequest>,
    ) -> Result<Response<proto::Connector>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "RenameConnector")?;
        let r = req.into_inner();
        let result = async {
            call.connector = r.connector.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            let c = s
                .registry
                .rename_connector(&workspace, &r.connector, &r.new_name)
                .await?;
            call.connector = format!("{} ({})", c.name, c.id);
            Ok(convert::connector(&c))
        }
        .await;
        s.finish(call, result).await
    }

    async fn delete_connector(
        &self,
        req: Request<proto::DeleteConnectorRequest>,
    ) -> Result<Response<proto::DeleteConnectorResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "DeleteConnector")?;
        let r = req.into_inner();
        let result = async {
            call.connector = r.connector.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            let removed = s
                .registry
                .delete_connector(&workspace, &r.connector)
                .await?;
            Ok(proto::DeleteConnectorResponse {
                connections_removed: removed as u32,
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn begin_connect(
        &self,
        req: Request<proto::BeginConnectRequest>,
    ) -> Result<Response<proto::BeginConnectResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "BeginConnect")?;
        let r = req.into_inner();
        let result = async {
            let target = self.admin_target(&mut call, r.connection).await?;
            let started = s
                .oauth
                .begin(&target, &r.return_url, &r.scopes, &r.login_hint)
                .await?;
            Ok(proto::BeginConnectResponse {
                authorization_url: started.authorization_url,
                state: started.state,
                expires_at: Some(convert::timestamp(started.expires_at)),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn complete_connect(
        &self,
        req: Request<proto::CompleteConnectRequest>,
    ) -> Result<Response<proto::Connection>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "CompleteConnect")?;
        let r = req.into_inner();
        let result = async {
            // The state names the connection; the caller must administer its workspace.
            let pending = s.oauth.take_state(&r.state).await?;
            call.workspace = pending.workspace.clone();
            call.connector = pending.connector_id.clone();
            call.user_id = pending.user_id.clone();
            s.authorize_admin(&call, &pending.workspace)?;
            let done = s.oauth.complete(pending, &r.code).await?;
            call.connector = format!("{} ({})", done.connector.name, done.connector.id);
            Ok(convert::connection(&done.connector, &done.connection))
        }
        .await;
        s.finish(call, result).await
    }

    async fn connect_with_credentials(
        &self,
        req: Request<proto::ConnectWithCredentialsRequest>,
    ) -> Result<Response<proto::ConnectWithCredentialsResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "ConnectWithCredentials")?;
        let r = req.into_inner();
        let result = async {
            let target = self.admin_target(&mut call, r.connection).await?;
            let done = s
                .connect
                .connect_with_credentials(
                    &target,
                    candidate(r.settings, r.secrets),
                    r.save_on_failure,
                )
                .await?;
            Ok(proto::ConnectWithCredentialsResponse {
                connection: Some(convert::connection(&target.connector, &done.connection)),
                test: Some(convert::report(&done.report)),
                saved: done.saved,
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn test_connection(
        &self,
        req: Request<proto::TestConnectionRequest>,
    ) -> Result<Response<proto::TestConnectionResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "TestConnection")?;
        let r = req.into_inner();
        let result = async {
            let target = self.admin_target(&mut call, r.connection).await?;
            let offered = (!r.settings.is_empty() || !r.secrets.is_empty())
                .then(|| candidate(r.settings, r.secrets));
            let report = s.connect.test(&target, offered).await?;
            Ok(proto::TestConnectionResponse {
                test: Some(convert::report(&report)),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn disconnect(
        &self,
        req: Request<proto::DisconnectRequest>,
    ) -> Result<Response<proto::DisconnectResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "Disconnect")?;
        let r = req.into_inner();
        let result = async {
            let target = self.admin_target(&mut call, r.connection).await?;
            let (connection, revoked) = if target.connector.kind == Kind::Oauth2 {
                s.oauth.disconnect(&target).await?
            } else {
                (s.connect.disconnect(&target).await?, false)
            };
            Ok(proto::DisconnectResponse {
                revoked,
                connection: Some(convert::connection(&target.connector, &connection)),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn get_connection(
        &self,
        req: Request<proto::GetConnectionRequest>,
    ) -> Result<Response<proto::Connection>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "GetConnection")?;
        let r = req.into_inner();
        let result = async {
            let target = self.admin_target(&mut call, r.connection).await?;
            let connection = s
                .registry
                .connection(&target.connector, &target.connection_user)
                .await?
                .unwrap_or_else(|| {
                    crate::model::Connection::new(&target.connector.id, &target.connection_user)
                });
            Ok(convert::connection(&target.connector, &connection))
        }
        .await;
        s.finish(call, result).await
    }

    async fn list_connections(
        &self,
        req: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "ListConnections")?;
        let r = req.into_inner();
        let result = async {
            call.user_id = r.user_id.clone();
            let workspace = self.admin_workspace(&mut call, "workspace", &r.workspace)?;
            crate::model::validate_user_id("user_id", &r.user_id)?;
            let rows = s.connect.statuses(&workspace, &r.user_id).await?;
            Ok(proto::ListConnectionsResponse {
                connections: rows
                    .iter()
                    .map(|(c, conn)| convert::connection(c, conn))
                    .collect(),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn query_audit(
        &self,
        req: Request<proto::QueryAuditRequest>,
    ) -> Result<Response<proto::QueryAuditResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "QueryAudit")?;
        let r = req.into_inner();
        let result = async {
            // Without a workspace, the whole log: only for admins of every workspace ("*").
            let scope = if r.workspace.is_empty() {
                "*".to_string()
            } else {
                workspace_or_default("workspace", &r.workspace)?
            };
            call.workspace = scope.clone();
            s.authorize_admin(&call, &scope)?;
            let limit = match r.limit {
                0 => 100,
                n if n <= AUDIT_PAGE_MAX => n,
                n => {
                    return Err(FieldError::new(
                        "limit",
                        format!("is {n}; at most {AUDIT_PAGE_MAX}"),
                    )
                    .into());
                }
            };
            let keep = |rec: &crate::audit::AuditRecord| {
                let e = &rec.event;
                (r.caller.is_empty() || e.caller == r.caller)
                    && (r.operation.is_empty() || e.operation == r.operation)
                    && (scope == "*" || e.workspace == scope)
                    && (r.connector.is_empty() || e.connector.contains(&r.connector))
                    && (r.outcome.is_empty() || e.outcome.is_some_and(|o| o.name() == r.outcome))
            };
            let records = s
                .audit
                .query(r.after_seq, limit as usize, AUDIT_SCAN_MAX, keep)
                .await?;
            Ok(proto::QueryAuditResponse {
                records: records
                    .into_iter()
                    .map(|rec| proto::AuditRecord {
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
                        hash: rec.hash,
                    })
                    .collect(),
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn get_audit_head(
        &self,
        req: Request<proto::GetAuditHeadRequest>,
    ) -> Result<Response<proto::AuditHead>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "GetAuditHead")?;
        let result = async {
            call.workspace = "*".into();
            s.authorize_admin(&call, "*")?;
            let head = s.audit.head();
            Ok(proto::AuditHead {
                seq: head.seq,
                hash: head.hash,
                time: convert::opt_timestamp(head.time),
            })
        }
        .await;
        s.finish(call, result).await
    }
}
