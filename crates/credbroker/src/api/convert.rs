//! Model ↔ protobuf. Nothing here ever copies a secret value into a response.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::proto;
use crate::mail::organize;
use crate::model::{Connection, ConnectionStatus, Connector, FieldError, Kind, Mode, Secret};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

pub fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, FieldError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(FieldError::new(field, "nanos must be in 0..1e9"));
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .ok_or_else(|| FieldError::new(field, "is out of range"))
}

pub fn kind_from(field: &str, kind: i32) -> Result<Kind, FieldError> {
    match proto::ConnectorKind::try_from(kind) {
        Ok(proto::ConnectorKind::ApiKey) => Ok(Kind::ApiKey),
        Ok(proto::ConnectorKind::Oauth2) => Ok(Kind::Oauth2),
        Ok(proto::ConnectorKind::ImapSmtp) => Ok(Kind::ImapSmtp),
        Ok(proto::ConnectorKind::Caldav) => Ok(Kind::Caldav),
        _ => Err(FieldError::new(
            field,
            "must be API_KEY, OAUTH2, IMAP_SMTP or CALDAV",
        )),
    }
}

pub fn kind_to(kind: Kind) -> proto::ConnectorKind {
    match kind {
        Kind::ApiKey => proto::ConnectorKind::ApiKey,
        Kind::Oauth2 => proto::ConnectorKind::Oauth2,
        Kind::ImapSmtp => proto::ConnectorKind::ImapSmtp,
        Kind::Caldav => proto::ConnectorKind::Caldav,
    }
}

pub fn mode_from(field: &str, mode: i32) -> Result<Mode, FieldError> {
    match proto::ConnectorMode::try_from(mode) {
        Ok(proto::ConnectorMode::Shared) => Ok(Mode::Shared),
        Ok(proto::ConnectorMode::Personal) => Ok(Mode::Personal),
        _ => Err(FieldError::new(field, "must be SHARED or PERSONAL")),
    }
}

fn mode_to(mode: Mode) -> proto::ConnectorMode {
    match mode {
        Mode::Shared => proto::ConnectorMode::Shared,
        Mode::Personal => proto::ConnectorMode::Personal,
    }
}

fn status_to(status: ConnectionStatus) -> proto::ConnectionStatus {
    match status {
        ConnectionStatus::Connected => proto::ConnectionStatus::Connected,
        ConnectionStatus::NotConnected => proto::ConnectionStatus::NotConnected,
        ConnectionStatus::Expired => proto::ConnectionStatus::Expired,
        ConnectionStatus::Error => proto::ConnectionStatus::Error,
    }
}

pub fn connector(c: &Connector) -> proto::Connector {
    proto::Connector {
        id: c.id.clone(),
        workspace: c.workspace.clone(),
        name: c.name.clone(),
        kind: kind_to(c.kind) as i32,
        mode: mode_to(c.mode) as i32,
        provider: c.provider.clone(),
        config: c.config.clone().into_iter().collect(),
        secrets_set: c.secrets_set.iter().cloned().collect(),
        created_at: Some(timestamp(c.created_at)),
        updated_at: Some(timestamp(c.updated_at)),
    }
}

pub fn connection(c: &Connector, conn: &Connection) -> proto::Connection {
    proto::Connection {
        workspace: c.workspace.clone(),
        connector_id: c.id.clone(),
        connector_name: c.name.clone(),
        kind: kind_to(c.kind) as i32,
        provider: c.provider.clone(),
        mode: mode_to(c.mode) as i32,
        user_id: conn.user_id.clone(),
        status: status_to(conn.status) as i32,
        account_label: conn.account_label.clone(),
        connected_at: opt_timestamp(conn.connected_at),
        last_used_at: opt_timestamp(conn.last_used_at),
        last_refreshed_at: opt_timestamp(conn.last_refreshed_at),
        last_error: conn.last_error.clone(),
        scopes: conn.scopes.clone(),
        expired_reason: conn
            .expired_reason
            .filter(|_| conn.status == crate::model::ConnectionStatus::Expired)
            .map(|r| r.name().to_string())
            .unwrap_or_default(),
    }
}

pub fn secrets(
    map: std::collections::HashMap<String, proto::SecretValue>,
) -> BTreeMap<String, Secret> {
    map.into_iter()
        .map(|(k, v)| (k, Secret::new(v.value)))
        .collect()
}

pub fn settings(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

pub fn report(r: &crate::model::TestReport) -> proto::TestResult {
    proto::TestResult {
        ok: r.ok(),
        checks: r
            .checks
            .iter()
            .map(|c| proto::ConnectionCheck {
                name: c.name.clone(),
                ok: c.ok,
                stage: c.stage.map(|s| s.name().to_string()).unwrap_or_default(),
                message: c.message.clone(),
            })
            .collect(),
        account_label: r.account_label.clone().unwrap_or_default(),
    }
}

pub fn mail(m: crate::mail::MailMessage) -> proto::MailMessage {
    proto::MailMessage {
        uid: m.uid,
        message_id: m.message_id,
        from: m.from,
        to: m.to,
        cc: m.cc,
        subject: m.subject,
        date: opt_timestamp(m.date),
        text_body: m.text_body,
        html_body: m.html_body,
        flags: m.flags,
        attachments: m
            .attachments
            .into_iter()
            .map(|a| proto::AttachmentInfo {
                filename: a.filename,
                content_type: a.content_type,
                size: a.size,
            })
            .collect(),
        in_reply_to: m.in_reply_to,
        references: m.references,
        reply_to: m.reply_to,
        size: m.size,
        truncated: m.truncated,
    }
}

/// The one reply that carries a secret: the credential itself.
pub fn credential(c: crate::driver::Credential) -> proto::ResolveCredentialResponse {
    proto::ResolveCredentialResponse {
        kind: kind_to(c.kind) as i32,
        secret: c.secret.expose().to_string(),
        token_type: c.form.token_type().to_string(),
        expires_at: opt_timestamp(c.expires_at),
        scopes: c.scopes,
        account_label: c.account_label,
        header_name: c.header_name,
        header_prefix: c.header_prefix,
    }
}

pub fn send_request(r: proto::SendEmailRequest) -> crate::mail::SendRequest {
    crate::mail::SendRequest {
        from: r.from,
        to: r.to,
        cc: r.cc,
        bcc: r.bcc,
        reply_to: r.reply_to,
        subject: r.subject,
        text_body: r.text_body,
        html_body: r.html_body,
        attachments: r
            .attachments
            .into_iter()
            .map(|a| crate::mail::OutgoingAttachment {
                filename: a.filename,
                content_type: a.content_type,
                content: a.content,
            })
            .collect(),
        in_reply_to: r.in_reply_to,
        references: r.references,
    }
}

pub fn fetch_query(
    r: proto::FetchMailRequest,
) -> Result<crate::mail::imap::FetchQuery, FieldError> {
    Ok(crate::mail::imap::FetchQuery {
        mailbox: r.mailbox,
        limit: r.limit,
        unseen_only: r.unseen_only,
        since_uid: r.since_uid,
        since: r
            .since
            .as_ref()
            .map(|t| from_timestamp("since", t))
            .transpose()?,
        include_html: r.include_html,
        mark_seen: r.mark_seen,
    })
}

pub fn watch_query(r: proto::WatchMailRequest) -> crate::mail::watch::WatchQuery {
    crate::mail::watch::WatchQuery {
        mailbox: r.mailbox,
        since_uid: r.since_uid,
        include_html: r.include_html,
    }
}

pub fn mail_event(e: crate::mail::watch::WatchEvent) -> proto::MailEvent {
    proto::MailEvent {
        message: Some(mail(e.message)),
        uid_validity: e.uid_validity,
    }
}

/// A Broker.Call request for the proxy.
pub fn call_request(r: proto::CallRequest) -> crate::proxy::CallRequest {
    crate::proxy::CallRequest {
        method: r.method,
        path: r.path,
        query: r.query.into_iter().map(|q| (q.name, q.value)).collect(),
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        body: r.body,
    }
}

/// What the proxy returned, as the reply.
pub fn call_response(r: crate::proxy::CallResponse) -> proto::CallResponse {
    proto::CallResponse {
        status: r.status.into(),
        headers: http_headers(r.headers),
        body: r.body,
    }
}

/// Response headers, as the reply's.
pub fn http_headers(headers: Vec<(String, String)>) -> Vec<proto::HttpHeader> {
    headers
        .into_iter()
        .map(|(name, value)| proto::HttpHeader { name, value })
        .collect()
}

/// The selection of a mail organisation request (required).
fn selection(s: Option<proto::MailSelection>) -> Result<organize::Selection, FieldError> {
    let s = s.ok_or_else(|| FieldError::new("selection", "is required"))?;
    Ok(organize::Selection {
        mailbox: s.mailbox,
        uid_validity: s.uid_validity,
        uids: s.uids,
    })
}

fn mail_flags(field: &str, flags: &[i32]) -> Result<Vec<organize::Flag>, FieldError> {
    flags
        .iter()
        .enumerate()
        .map(|(i, f)| match proto::MailFlag::try_from(*f) {
            Ok(proto::MailFlag::Seen) => Ok(organize::Flag::Seen),
            Ok(proto::MailFlag::Flagged) => Ok(organize::Flag::Flagged),
            Ok(proto::MailFlag::Answered) => Ok(organize::Flag::Answered),
            Ok(proto::MailFlag::Deleted) => Ok(organize::Flag::Deleted),
            _ => Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("is {f}; must be SEEN, FLAGGED, ANSWERED or DELETED"),
            )),
        })
        .collect()
}

pub fn move_request(r: proto::MoveMessagesRequest) -> Result<organize::Request, FieldError> {
    Ok(organize::Request {
        selection: selection(r.selection)?,
        action: organize::Action::Move {
            destination: r.destination,
        },
    })
}

pub fn flags_request(r: proto::SetFlagsRequest) -> Result<organize::Request, FieldError> {
    Ok(organize::Request {
        selection: selection(r.selection)?,
        action: organize::Action::Flags(organize::FlagChange {
            add: mail_flags("add", &r.add)?,
            remove: mail_flags("remove", &r.remove)?,
            add_labels: r.add_labels,
            remove_labels: r.remove_labels,
        }),
    })
}

pub fn delete_request(r: proto::DeleteMessagesRequest) -> Result<organize::Request, FieldError> {
    Ok(organize::Request {
        selection: selection(r.selection)?,
        action: organize::Action::Delete { expunge: r.expunge },
    })
}

pub fn organized(o: organize::Outcome) -> proto::OrganizeMailResponse {
    proto::OrganizeMailResponse {
        uids: o.uids,
        missing: o.missing,
        destination: o.destination,
        expunged: o.expunged,
        destination_uids: o.destination_uids,
        destination_uid_validity: o.destination_uid_validity,
    }
}

pub fn folders(f: organize::Folders) -> proto::ListFoldersResponse {
    proto::ListFoldersResponse {
        folders: f
            .folders
            .into_iter()
            .map(|f| proto::MailFolder {
                name: f.name,
                delimiter: f.delimiter,
                attributes: f.attributes,
            })
            .collect(),
        trash: f.trash,
        labels: f.labels,
    }
}
