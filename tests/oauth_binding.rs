//! OAuth account linking played as an attacker against the real daemon and oidc-provider: an
//! authorization URL opened by another browser, a callback whose `iss` names another issuer,
//! and a connector whose token endpoint is moved while a person is consenting.

mod support;

use credbroker::api::proto::{self, admin_client::AdminClient};
use std::collections::HashMap;

use support::daemon::{Daemon, conn};
use support::oauth::{Browser, RETURN_URL, begin, callback_url, create_connector};
use support::peers::{OAuthStats, peers};
use tonic::transport::Channel;

/// The tests share the provider's counters.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONNECTOR: &str = "Team Mail";

async fn status(admin: &mut AdminClient<Channel>, user: &str) -> proto::ConnectionStatus {
    let shown = admin
        .get_connection(proto::GetConnectionRequest {
            connection: conn(CONNECTOR, user),
        })
        .await
        .unwrap()
        .into_inner();
    proto::ConnectionStatus::try_from(shown.status).unwrap()
}

/// One test's daemon with the connector, holding [`SERIAL`], and the provider's counters at
/// the start.
struct Setup {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    daemon: Daemon,
    admin: AdminClient<Channel>,
    before: OAuthStats,
}

async fn setup() -> Setup {
    let serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    Setup {
        _serial: serial,
        daemon,
        admin,
        before: peers().oauth_stats().await,
    }
}

/// How many audit records about `user`'s connection give a reason containing `text`.
async fn audited(admin: &mut AdminClient<Channel>, user: &str, text: &str) -> usize {
    let audit = admin
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    audit
        .records
        .iter()
        .filter(|r| r.user_id == user && r.reason.contains(text))
        .count()
}

#[tokio::test]
async fn an_authorization_url_opened_by_another_browser_links_nothing() {
    let Setup {
        _serial,
        daemon,
        mut admin,
        before,
    } = setup().await;
    let started = begin(&mut admin, CONNECTOR, "u1", "").await;

    // Browser A, the one the platform sent, opens the link: the daemon binds it with a cookie
    // and sends it to the provider.
    let mut a = Browser::new(&daemon);
    let opened = a.get(&started.authorization_url).await;
    assert_eq!(opened.status().as_u16(), 303);
    let set_cookie = opened.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in [
        "__Host-credbroker-link=",
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let at_provider = opened.headers()["location"].to_str().unwrap().to_string();
    assert!(
        at_provider.starts_with(&peers().oauth_issuer()),
        "{at_provider}"
    );
    // The provider's URL is handed to browser B (the attack: B's account would land on u1's
    // connection).
    let mut b = Browser::new(&daemon);
    let callback = b.consent(&at_provider, &callback_url(&daemon)).await;
    let refused = b.get(&callback).await;
    let code = refused.status().as_u16();
    let page = refused.text().await.unwrap();
    assert_eq!(code, 403, "B's browser completed u1's link: {page}");
    assert!(page.contains("another browser"), "{page}");
    assert_ne!(
        status(&mut admin, "u1").await,
        proto::ConnectionStatus::Connected
    );
    // The code B carried was never redeemed.
    assert_eq!(
        peers().oauth_stats().await.authorization_code,
        before.authorization_code
    );
    // B opening the broker's link itself is refused too: A's browser holds it.
    let opened = b.get(&started.authorization_url).await;
    assert_eq!(opened.status().as_u16(), 403);

    // Nor can B cancel A's link by bringing back an error for its state.
    let cancel = format!(
        "{}?state={}&error=access_denied",
        callback_url(&daemon),
        started.state
    );
    assert_eq!(b.get(&cancel).await.status().as_u16(), 403);

    // The refusals did not consume the state: A finishes its own link.
    let callback = a.consent(&at_provider, &callback_url(&daemon)).await;
    let done = a.get(&callback).await;
    assert_eq!(
        done.status().as_u16(),
        303,
        "{}",
        done.text().await.unwrap()
    );
    assert_eq!(
        status(&mut admin, "u1").await,
        proto::ConnectionStatus::Connected
    );
    let other_browser = audited(&mut admin, "u1", "another browser").await;
    assert_eq!(other_browser, 3, "B's start, callback and cancel");
}

/// Connects u1 through a browser, with `tamper` applied to the callback URL before the
/// browser follows it; returns the outcome the browser was sent back with.
async fn connect_tampered(
    daemon: &Daemon,
    admin: &mut AdminClient<Channel>,
    tamper: impl FnOnce(&mut reqwest::Url),
) -> HashMap<String, String> {
    let started = begin(admin, CONNECTOR, "u1", "").await;
    let mut browser = Browser::new(daemon);
    let at_provider = browser.open(&started.authorization_url).await;
    let callback = browser.consent(&at_provider, &callback_url(daemon)).await;
    let mut callback = reqwest::Url::parse(&callback).unwrap();
    tamper(&mut callback);
    let response = browser.get(callback.as_str()).await;
    assert_eq!(response.status().as_u16(), 303);
    let back = response.headers()["location"].to_str().unwrap().to_string();
    assert!(back.starts_with(RETURN_URL), "{back}");
    reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// The callback URL with its `iss` replaced (a mix-up: another server's response).
fn with_iss(url: &mut reqwest::Url, iss: &str) {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| k != "iss")
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair("iss", iss);
}

#[tokio::test]
async fn a_callback_naming_another_issuer_links_nothing() {
    let Setup {
        _serial,
        daemon,
        mut admin,
        before,
    } = setup().await;
    let issuer = peers().oauth_issuer();

    // oidc-provider sends `iss` (RFC 9207); one naming another server is refused.
    let mut sent = None;
    let outcome = connect_tampered(&daemon, &mut admin, |url| {
        sent = url
            .query_pairs()
            .find(|(k, _)| k == "iss")
            .map(|(_, v)| v.into_owned());
        with_iss(url, "https://evil.test");
    })
    .await;
    assert_eq!(
        sent.as_deref(),
        Some(issuer.as_str()),
        "the provider sent no iss"
    );
    assert_eq!(outcome["status"], "error", "{outcome:?}");
    assert!(outcome["error"].contains("RFC 9207"), "{outcome:?}");
    assert_ne!(
        status(&mut admin, "u1").await,
        proto::ConnectionStatus::Connected
    );
    assert_eq!(
        peers().oauth_stats().await.authorization_code,
        before.authorization_code,
        "the code was redeemed"
    );

    // With `issuer` configured, the exact issuer is required: present and equal.
    admin
        .update_connector(proto::UpdateConnectorRequest {
            connector: CONNECTOR.into(),
            config: [("issuer".to_string(), issuer.clone())].into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["config.issuer".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let outcome = connect_tampered(&daemon, &mut admin, |url| {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .into_owned()
            .filter(|(k, _)| k != "iss")
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    })
    .await;
    assert_eq!(outcome["status"], "error", "{outcome:?}");
    assert!(outcome["error"].contains("RFC 9207"), "{outcome:?}");
    let outcome = connect_tampered(&daemon, &mut admin, |_| {}).await;
    assert_eq!(outcome["status"], "connected", "{outcome:?}");
    assert_eq!(
        status(&mut admin, "u1").await,
        proto::ConnectionStatus::Connected
    );
}

#[tokio::test]
async fn the_code_goes_only_to_the_token_endpoint_of_begin_connect() {
    let Setup {
        _serial,
        daemon,
        mut admin,
        before,
    } = setup().await;
    let started = begin(&mut admin, CONNECTOR, "u1", "").await;
    let mut browser = Browser::new(&daemon);
    let at_provider = browser.open(&started.authorization_url).await;
    let callback = browser.consent(&at_provider, &callback_url(&daemon)).await;

    // While the person consents, the token endpoint moves to a listener the admin watches.
    let watched = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    watched.set_nonblocking(true).unwrap();
    let moved_to = format!("https://{}/token", watched.local_addr().unwrap());
    admin
        .update_connector(proto::UpdateConnectorRequest {
            connector: CONNECTOR.into(),
            config: [("token_url".to_string(), moved_to)].into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["config.token_url".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let response = browser.get(&callback).await;
    assert_eq!(response.status().as_u16(), 303);
    let back = response.headers()["location"].to_str().unwrap().to_string();
    let outcome: HashMap<_, _> = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(outcome["status"], "error", "{outcome:?}");
    assert!(
        outcome["error"].contains("changed its provider endpoints"),
        "{outcome:?}"
    );
    // Nothing reached the new endpoint, and the code was redeemed nowhere: tokens of the
    // provider consented at never land under a connector that now points elsewhere.
    assert!(
        matches!(watched.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the daemon connected to the new token endpoint"
    );
    assert_eq!(
        peers().oauth_stats().await.authorization_code,
        before.authorization_code
    );
    assert_ne!(
        status(&mut admin, "u1").await,
        proto::ConnectionStatus::Connected
    );
}
