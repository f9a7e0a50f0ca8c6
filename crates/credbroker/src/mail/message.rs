//! Outgoing mail: validated field by field before anything is sent (addresses, header
//! injection, sizes, `from` restricted to the account and its aliases), then built with lettre.
//! Incoming mail: parsed with mail-parser (decoded headers and bodies in any charset).

use chrono::{DateTime, Utc};
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MessageBuilder, MultiPart, SinglePart};

use super::Account;
use crate::model::FieldError;

/// Largest text or HTML body.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Largest single attachment.
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;
/// Largest sum of bodies and attachments (before transfer encoding).
pub const MAX_MESSAGE_BYTES: usize = 15 * 1024 * 1024;
pub const MAX_ATTACHMENTS: usize = 32;
/// Recipients of one message, to + cc + bcc.
pub const MAX_RECIPIENTS: usize = 100;
pub const MAX_SUBJECT_CHARS: usize = 998;
pub const MAX_REFERENCES: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct OutgoingAttachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

/// A SendEmail request, as the domain sees it.
#[derive(Debug, Clone, Default)]
pub struct SendRequest {
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub reply_to: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
    pub attachments: Vec<OutgoingAttachment>,
    pub in_reply_to: String,
    pub references: Vec<String>,
}

/// A message ready to go: lettre's message and what SendEmail answers.
#[derive(Debug)]
pub struct Outgoing {
    pub message: lettre::Message,
    pub message_id: String,
    pub recipients: Vec<String>,
}

/// What SendEmail answers.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message_id: String,
    pub accepted: Vec<String>,
}

fn no_line_breaks(field: &str, value: &str) -> Result<(), FieldError> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(FieldError::new(
            field,
            "must not contain line breaks (CR/LF) or NUL",
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// "Name <a@b>" or "a@b"; no line breaks.
fn mailbox(field: &str, value: &str) -> Result<Mailbox, FieldError> {
    no_line_breaks(field, value)?;
    let value = value.trim();
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    value.parse::<Mailbox>().map_err(|e| {
        FieldError::new(
            field,
            format!("{value:?} is not a valid email address ({e})"),
        )
    })
}

/// A Message-ID as "<left@right>", accepted with or without the angle brackets.
pub fn msg_id(field: &str, value: &str) -> Result<String, FieldError> {
    no_line_breaks(field, value)?;
    let v = value.trim();
    let inner = v
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(v);
    let ok = inner.len() <= 250
        && inner
            .split_once('@')
            .is_some_and(|(l, r)| !l.is_empty() && !r.is_empty())
        && inner
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | '\\' | ',' | ';'));
    if !ok {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not a Message-ID (expected <id@domain>)"),
        ));
    }
    Ok(format!("<{inner}>"))
}

fn recipients(field: &str, list: &[String]) -> Result<Vec<Mailbox>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| mailbox(&format!("{field}[{i}]"), v))
        .collect()
}

/// The sender: the request's `from`, else the account's address; always the account's own
/// address or one of its aliases.
fn sender(account: &Account, from: &str) -> Result<Mailbox, FieldError> {
    let from = if from.trim().is_empty() {
        Mailbox::new(None, super::account::parse_address("from", &account.email)?)
    } else {
        mailbox("from", from)?
    };
    if !account.owns(from.email.as_ref()) {
        let mut allowed = vec![account.email.clone()];
        allowed.extend(account.aliases.iter().cloned());
        return Err(FieldError::new(
            "from",
            format!(
                "{} is not this account's address or one of its aliases ({})",
                from.email,
                allowed.join(", ")
            ),
        ));
    }
    Ok(from)
}

/// To, cc and bcc, validated; at least one and at most [`MAX_RECIPIENTS`] in all.
struct Recipients {
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
}

impl Recipients {
    fn of(r: &SendRequest) -> Result<Recipients, FieldError> {
        let to = recipients("to", &r.to)?;
        let cc = recipients("cc", &r.cc)?;
        let bcc = recipients("bcc", &r.bcc)?;
        let count = to.len() + cc.len() + bcc.len();
        if count == 0 {
            return Err(FieldError::new(
                "to",
                "at least one recipient (to, cc or bcc) is required",
            ));
        }
        if count > MAX_RECIPIENTS {
            return Err(FieldError::new(
                "to",
                format!("{count} recipients; at most {MAX_RECIPIENTS} in to, cc and bcc together"),
            ));
        }
        Ok(Recipients { to, cc, bcc })
    }

    /// Adds every recipient to the message (bcc to the envelope only, as lettre does) and
    /// returns the envelope's addresses, each once whatever its case.
    fn address(self, mut builder: MessageBuilder) -> (MessageBuilder, Vec<String>) {
        let mut all = Vec::with_capacity(self.to.len() + self.cc.len() + self.bcc.len());
        for m in self.to {
            all.push(m.email.to_string());
            builder = builder.to(m);
        }
        for m in self.cc {
            all.push(m.email.to_string());
            builder = builder.cc(m);
        }
        for m in self.bcc {
            all.push(m.email.to_string());
            builder = builder.bcc(m);
        }
        let mut unique = Vec::new();
        for a in all {
            if !unique.iter().any(|r: &String| r.eq_ignore_ascii_case(&a)) {
                unique.push(a);
            }
        }
        (builder, unique)
    }
}

/// The subject: one line of at most [`MAX_SUBJECT_CHARS`] characters.
fn check_subject(subject: &str) -> Result<(), FieldError> {
    no_line_breaks("subject", subject)?;
    let subject_chars = subject.chars().count();
    if subject_chars > MAX_SUBJECT_CHARS {
        return Err(FieldError::new(
            "subject",
            format!("is {subject_chars} characters long; at most {MAX_SUBJECT_CHARS}"),
        ));
    }
    Ok(())
}

/// The text and HTML bodies: each at most [`MAX_BODY_BYTES`], without NUL.
fn check_bodies(r: &SendRequest) -> Result<(), FieldError> {
    for (field, body) in [("text_body", &r.text_body), ("html_body", &r.html_body)] {
        if body.len() > MAX_BODY_BYTES {
            return Err(FieldError::new(
                field,
                format!("is {} bytes; at most {MAX_BODY_BYTES}", body.len()),
            ));
        }
        if body.contains('\0') {
            return Err(FieldError::new(field, "must not contain NUL"));
        }
    }
    Ok(())
}

/// The attachments as MIME parts: at most [`MAX_ATTACHMENTS`], each checked in turn, and
/// with the bodies (`bodies` bytes) at most [`MAX_MESSAGE_BYTES`] in all.
fn attachments(list: &[OutgoingAttachment], bodies: usize) -> Result<Vec<SinglePart>, FieldError> {
    if list.len() > MAX_ATTACHMENTS {
        return Err(FieldError::new(
            "attachments",
            format!("{} attachments; at most {MAX_ATTACHMENTS}", list.len()),
        ));
    }
    let mut total = bodies;
    let mut parts = Vec::with_capacity(list.len());
    for (i, a) in list.iter().enumerate() {
        parts.push(attachment(i, a)?);
        total += a.content.len();
    }
    if total > MAX_MESSAGE_BYTES {
        return Err(FieldError::new(
            "attachments",
            format!(
                "the message is {total} bytes of bodies and attachments; at most {MAX_MESSAGE_BYTES}"
            ),
        ));
    }
    Ok(parts)
}

/// Attachment `i`: a plain file name, at most [`MAX_ATTACHMENT_BYTES`], a MIME type
/// (application/octet-stream when none is given); its content base64-encoded.
fn attachment(i: usize, a: &OutgoingAttachment) -> Result<SinglePart, FieldError> {
    let name_field = format!("attachments[{i}].filename");
    no_line_breaks(&name_field, &a.filename)?;
    if a.filename.trim().is_empty() {
        return Err(FieldError::new(name_field, "must not be empty"));
    }
    if a.filename.len() > 255 || a.filename.contains(['/', '\\']) {
        return Err(FieldError::new(
            name_field,
            "must be a file name of at most 255 bytes, without '/' or '\\'",
        ));
    }
    if a.content.len() > MAX_ATTACHMENT_BYTES {
        return Err(FieldError::new(
            format!("attachments[{i}].content"),
            format!(
                "is {} bytes; at most {MAX_ATTACHMENT_BYTES}",
                a.content.len()
            ),
        ));
    }
    let type_field = format!("attachments[{i}].content_type");
    no_line_breaks(&type_field, &a.content_type)?;
    let content_type = match a.content_type.trim() {
        "" => ContentType::parse("application/octet-stream").expect("a valid MIME type"),
        t => ContentType::parse(t).map_err(|_| {
            FieldError::new(
                type_field,
                format!("{t:?} is not a MIME type (e.g. application/pdf)"),
            )
        })?,
    };
    // Base64 always: attachments arrive byte for byte (no line-ending rewriting on the way).
    let content = lettre::message::Body::new_with_encoding(
        a.content.clone(),
        lettre::message::header::ContentTransferEncoding::Base64,
    )
    .map_err(|_| FieldError::new(format!("attachments[{i}].content"), "cannot be encoded"))?;
    Ok(Attachment::new(a.filename.clone()).body(content, content_type))
}

/// In-Reply-To and References as Message-IDs; the References end with the message replied to
/// (RFC 5322 §3.6.4).
fn threading(r: &SendRequest) -> Result<(Option<String>, Vec<String>), FieldError> {
    let in_reply_to = match r.in_reply_to.trim() {
        "" => None,
        v => Some(msg_id("in_reply_to", v)?),
    };
    if r.references.len() > MAX_REFERENCES {
        return Err(FieldError::new(
            "references",
            format!("{} entries; at most {MAX_REFERENCES}", r.references.len()),
        ));
    }
    let mut references = r
        .references
        .iter()
        .enumerate()
        .map(|(i, v)| msg_id(&format!("references[{i}]"), v))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(parent) = &in_reply_to
        && !references.contains(parent)
    {
        references.push(parent.clone());
    }
    Ok((in_reply_to, references))
}

/// A fresh, unguessable Message-ID in the sender's domain.
fn new_message_id(domain: &str) -> String {
    format!(
        "<{}.{}@{}>",
        Utc::now().format("%Y%m%d%H%M%S"),
        hex::encode(crate::vault::random_bytes::<12>()),
        domain
    )
}

/// Validates a request against the account and builds the message. Nothing is sent here.
/// Fields are checked in the order they are listed in the request, so the first bad one is
/// the one named.
pub fn build(account: &Account, r: SendRequest) -> Result<Outgoing, FieldError> {
    let from = sender(account, &r.from)?;
    let recipients = Recipients::of(&r)?;
    let reply_to = match r.reply_to.trim() {
        "" => None,
        _ => Some(mailbox("reply_to", &r.reply_to)?),
    };
    check_subject(&r.subject)?;
    check_bodies(&r)?;
    let attachments = attachments(&r.attachments, r.text_body.len() + r.html_body.len())?;
    let (in_reply_to, references) = threading(&r)?;

    let message_id = new_message_id(from.email.domain());
    let builder = lettre::Message::builder()
        .from(from)
        .subject(r.subject.clone())
        .message_id(Some(message_id.clone()))
        .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")).to_string());
    let (mut builder, recipients) = recipients.address(builder);
    if let Some(m) = reply_to {
        builder = builder.reply_to(m);
    }
    if let Some(id) = in_reply_to {
        builder = builder.in_reply_to(id);
    }
    if !references.is_empty() {
        builder = builder.references(references.join(" "));
    }
    let message = assemble(builder, Body::of(&r), attachments)
        .map_err(|e| FieldError::new("to", format!("cannot build the message: {e}")))?;
    Ok(Outgoing {
        message,
        message_id,
        recipients,
    })
}

/// The message's body: the parts alone, or a multipart/mixed of them and the attachments.
fn assemble(
    builder: MessageBuilder,
    body: Body,
    attachments: Vec<SinglePart>,
) -> Result<lettre::Message, lettre::error::Error> {
    if attachments.is_empty() {
        return match body {
            Body::Single(part) => builder.singlepart(part),
            Body::Multi(part) => builder.multipart(part),
        };
    }
    let mixed = MultiPart::mixed();
    let mut mixed = match body {
        Body::Single(part) => mixed.singlepart(part),
        Body::Multi(part) => mixed.multipart(part),
    };
    for a in attachments {
        mixed = mixed.singlepart(a);
    }
    builder.multipart(mixed)
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

impl Body {
    /// Plain text, HTML, or both as multipart/alternative.
    fn of(r: &SendRequest) -> Body {
        match (r.text_body.is_empty(), r.html_body.is_empty()) {
            (_, true) => Body::Single(SinglePart::plain(r.text_body.clone())),
            (true, false) => Body::Single(SinglePart::html(r.html_body.clone())),
            (false, false) => Body::Multi(MultiPart::alternative_plain_html(
                r.text_body.clone(),
                r.html_body.clone(),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Incoming

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    pub filename: String,
    pub content_type: String,
    pub size: u64,
}

/// One message read from a mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailMessage {
    pub uid: u32,
    pub message_id: String,
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub reply_to: String,
    pub subject: String,
    pub date: Option<DateTime<Utc>>,
    pub text_body: String,
    pub html_body: String,
    pub flags: Vec<String>,
    pub attachments: Vec<AttachmentInfo>,
    pub in_reply_to: String,
    pub references: Vec<String>,
    /// The message's size on the server (RFC822.SIZE), in bytes.
    pub size: u64,
    /// Larger than the per-message cap: only its first bytes were read (see
    /// [`super::imap::Caps`]).
    pub truncated: bool,
}

fn addr_string(a: &mail_parser::Addr<'_>) -> Option<String> {
    let address = a.address()?;
    Some(match a.name().filter(|n| !n.is_empty()) {
        Some(name) => format!("{name} <{address}>"),
        None => address.to_string(),
    })
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    a.map(|a| a.iter().filter_map(addr_string).collect())
        .unwrap_or_default()
}

fn ids(v: &mail_parser::HeaderValue<'_>) -> Vec<String> {
    let list: Vec<&str> = match v {
        mail_parser::HeaderValue::Text(t) => vec![t.as_ref()],
        mail_parser::HeaderValue::TextList(l) => l.iter().map(|s| s.as_ref()).collect(),
        _ => Vec::new(),
    };
    list.into_iter().map(|s| format!("<{s}>")).collect()
}

/// Parses a raw message (RFC 5322). `html` keeps the HTML body; attachments are listed, not
/// returned.
pub fn parse(raw: &[u8], html: bool) -> MailMessage {
    use mail_parser::MimeHeaders;
    let Some(m) = mail_parser::MessageParser::default().parse(raw) else {
        return MailMessage::default();
    };
    // Bodies come back with the line breaks the sender wrote (MIME transports CRLF).
    let text_body = m
        .body_text(0)
        .map(|s| s.replace("\r\n", "\n"))
        .unwrap_or_default();
    // mail-parser offers a text part converted to HTML when there is no HTML part: only a
    // real HTML part is returned.
    let html_body = if html {
        m.html_bodies()
            .next()
            .filter(|p| p.is_content_type("text", "html"))
            .and_then(|p| p.text_contents())
            .map(|s| s.replace("\r\n", "\n"))
            .unwrap_or_default()
    } else {
        String::new()
    };
    let attachments = m
        .attachments()
        .map(|p| AttachmentInfo {
            filename: p.attachment_name().unwrap_or_default().to_string(),
            content_type: p
                .content_type()
                .map(|t| match t.subtype() {
                    Some(sub) => format!("{}/{}", t.ctype(), sub),
                    None => t.ctype().to_string(),
                })
                .unwrap_or_else(|| "application/octet-stream".into()),
            size: p.len() as u64,
        })
        .collect();
    MailMessage {
        uid: 0,
        message_id: m
            .message_id()
            .map(|id| format!("<{id}>"))
            .unwrap_or_default(),
        from: addresses(m.from()).into_iter().next().unwrap_or_default(),
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        reply_to: addresses(m.reply_to())
            .into_iter()
            .next()
            .unwrap_or_default(),
        subject: m.subject().unwrap_or_default().to_string(),
        date: m
            .date()
            .and_then(|d| DateTime::from_timestamp(d.to_timestamp(), 0)),
        text_body,
        html_body,
        flags: Vec::new(),
        attachments,
        in_reply_to: ids(m.in_reply_to()).into_iter().next().unwrap_or_default(),
        references: ids(m.references()),
        size: raw.len() as u64,
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::account::{Auth, Endpoint, TlsMode};
    use crate::model::Secret;

    fn account() -> Account {
        let ep = |h: &str| Endpoint {
            host: h.into(),
            port: 1,
            tls: TlsMode::Implicit,
        };
        Account {
            key: "k".into(),
            fingerprint: "f".into(),
            email: "alice@x.test".into(),
            username: "alice@x.test".into(),
            aliases: vec!["support@x.test".into()],
            trash: None,
            imap: ep("i"),
            smtp: ep("s"),
            ca_pem: None,
            tls: crate::tls::client_config(None).unwrap(),
            auth: Auth::Password(Secret::new("pw")),
        }
    }

    fn request() -> SendRequest {
        SendRequest {
            to: vec!["Bob <bob@x.test>".into()],
            subject: "Hello".into(),
            text_body: "Hi Bob".into(),
            ..Default::default()
        }
    }

    type Case = (fn(&mut SendRequest), &'static str);
    type BoxedCase = (Box<dyn Fn(&mut SendRequest)>, &'static str);

    fn field_of(r: SendRequest) -> String {
        build(&account(), r).unwrap_err().field
    }

    /// Each change to a good request is refused naming its field.
    fn refused_as<F: Fn(&mut SendRequest)>(cases: Vec<(F, &'static str)>) {
        for (change, field) in cases {
            let mut r = request();
            change(&mut r);
            assert_eq!(field_of(r), field);
        }
    }

    /// One attachment named `filename`, of `content_type`, empty.
    fn file(filename: &str, content_type: &str) -> Vec<OutgoingAttachment> {
        vec![OutgoingAttachment {
            filename: filename.into(),
            content_type: content_type.into(),
            ..Default::default()
        }]
    }

    #[test]
    fn builds_a_reply_with_alternatives_and_attachment() {
        let mut r = request();
        r.from = "Support <SUPPORT@x.test>".into();
        r.cc = vec!["carol@x.test".into()];
        r.bcc = vec!["dave@x.test".into(), "bob@x.test".into()];
        r.reply_to = "help@x.test".into();
        r.html_body = "<p>Hi <b>Bob</b></p>".into();
        r.text_body = "Hi Bob,\nsee you".into();
        r.in_reply_to = "parent@x.test".into();
        r.references = vec!["<root@x.test>".into()];
        r.subject = "Réunion à 10h".into();
        r.attachments = vec![OutgoingAttachment {
            filename: "notes.txt".into(),
            content_type: "text/plain".into(),
            content: b"attached\nline\n".to_vec(),
        }];
        let out = build(&account(), r).unwrap();
        assert_eq!(
            out.recipients,
            ["bob@x.test", "carol@x.test", "dave@x.test"]
        );
        assert!(out.message_id.starts_with('<') && out.message_id.ends_with("@x.test>"));
        let raw = out.message.formatted();
        let text = String::from_utf8_lossy(&raw);
        assert!(
            !text.contains("dave@x.test"),
            "Bcc must not be in the headers"
        );
        let parsed = parse(&raw, true);
        assert_eq!(parsed.subject, "Réunion à 10h");
        assert_eq!(parsed.from, "Support <SUPPORT@x.test>");
        assert_eq!(parsed.text_body.trim_end(), "Hi Bob,\nsee you");
        assert_eq!(parsed.html_body.trim_end(), "<p>Hi <b>Bob</b></p>");
        assert_eq!(parsed.in_reply_to, "<parent@x.test>");
        assert_eq!(parsed.references, ["<root@x.test>", "<parent@x.test>"]);
        assert_eq!(parsed.message_id, out.message_id);
        assert_eq!(parsed.reply_to, "help@x.test");
        assert_eq!(
            parsed.attachments,
            [AttachmentInfo {
                filename: "notes.txt".into(),
                content_type: "text/plain".into(),
                size: 14
            }]
        );
    }

    #[test]
    fn header_injection_is_refused_naming_the_field() {
        let cases: Vec<Case> = vec![
            (|r| r.subject = "Hi\r\nBcc: eve@evil.test".into(), "subject"),
            (|r| r.subject = "Hi\nX: y".into(), "subject"),
            (
                |r| r.to = vec!["bob@x.test\r\nBcc: eve@evil.test".into()],
                "to[0]",
            ),
            (
                |r| r.cc = vec!["ok@x.test".into(), "a@x.test\nb".into()],
                "cc[1]",
            ),
            (|r| r.bcc = vec!["x\r@x.test".into()], "bcc[0]"),
            (|r| r.reply_to = "a@x.test\r\nX: y".into(), "reply_to"),
            (
                |r| r.from = "alice@x.test\r\nBcc: eve@evil.test".into(),
                "from",
            ),
            (
                |r| r.in_reply_to = "<a@b>\r\nBcc: eve@evil.test".into(),
                "in_reply_to",
            ),
            (
                |r| r.references = vec!["<a@b>\nX: y".into()],
                "references[0]",
            ),
            (
                |r| r.attachments = file("a\r\nb.txt", ""),
                "attachments[0].filename",
            ),
            (
                |r| r.attachments = file("a.txt", "text/plain\r\nX: y"),
                "attachments[0].content_type",
            ),
        ];
        refused_as(cases);
    }

    #[test]
    fn bad_addresses_from_and_sizes_are_refused() {
        let cases: Vec<BoxedCase> = vec![
            (Box::new(|r| r.to = vec!["not-an-address".into()]), "to[0]"),
            (Box::new(|r| r.to = vec!["".into()]), "to[0]"),
            (Box::new(|r| r.to.clear()), "to"),
            (Box::new(|r| r.from = "mallory@x.test".into()), "from"),
            (Box::new(|r| r.from = "alice@other.test".into()), "from"),
            (
                Box::new(|r| r.in_reply_to = "no-at-sign".into()),
                "in_reply_to",
            ),
            (
                Box::new(|r| r.text_body = "x".repeat(MAX_BODY_BYTES + 1)),
                "text_body",
            ),
            (
                Box::new(|r| {
                    r.to = (0..=MAX_RECIPIENTS)
                        .map(|i| format!("u{i}@x.test"))
                        .collect()
                }),
                "to",
            ),
            (
                Box::new(|r| {
                    r.attachments = vec![OutgoingAttachment {
                        filename: "big.bin".into(),
                        content: vec![0; MAX_ATTACHMENT_BYTES + 1],
                        ..Default::default()
                    }]
                }),
                "attachments[0].content",
            ),
            (
                Box::new(|r| {
                    r.attachments = (0..2)
                        .map(|i| OutgoingAttachment {
                            filename: format!("{i}.bin"),
                            content: vec![0; MAX_ATTACHMENT_BYTES],
                            ..Default::default()
                        })
                        .collect()
                }),
                "attachments",
            ),
            (
                Box::new(|r| r.attachments = file("a.txt", "not a type")),
                "attachments[0].content_type",
            ),
        ];
        refused_as(cases);
    }

    #[test]
    fn from_defaults_to_the_account() {
        let out = build(&account(), request()).unwrap();
        let parsed = parse(&out.message.formatted(), false);
        assert_eq!(parsed.from, "alice@x.test");
        assert!(parsed.html_body.is_empty());
    }

    #[test]
    fn parses_other_charsets() {
        let raw = b"From: =?ISO-8859-1?Q?Ren=E9?= <rene@x.test>\r\nTo: a@x.test\r\nSubject: =?ISO-8859-1?Q?caf=E9?=\r\nMessage-ID: <m1@x.test>\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nd=E9j=E0 vu\r\n";
        let m = parse(raw, true);
        assert_eq!(m.from, "René <rene@x.test>");
        assert_eq!(m.subject, "café");
        assert_eq!(m.text_body.trim_end(), "déjà vu");
        assert_eq!(m.message_id, "<m1@x.test>");
        assert!(m.html_body.is_empty());
    }
}
