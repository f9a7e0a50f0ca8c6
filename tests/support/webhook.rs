//! A webhook receiver of the tests' own (it stands for the platform's backend): HTTPS on a
//! port of its own under a CA of its own. It records each request, can be taken down (listener
//! and open connections gone) and brought back on the same port, and can answer 503 to the next
//! requests; [`assert_signed`] checks a delivery the way the README tells a receiver to.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credbroker_devpki::CertAuthority;
use hmac::Mac;

use super::daemon::tls_acceptor;
use super::https::serve_one;

pub const HOOK_SECRET: &str = "hook-secret-canary-6f1d0c9a2b7e4f3a8d5c";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub signature: String,
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Clone, Default)]
pub struct Recorder {
    pub got: Arc<Mutex<Vec<Delivery>>>,
    /// Requests still to answer 503 (after recording them).
    pub refuse: Arc<AtomicUsize>,
}

async fn record(
    axum::extract::State(rec): axum::extract::State<Recorder>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> http::StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let refused = rec
        .refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = match refused {
        true => http::StatusCode::SERVICE_UNAVAILABLE,
        false => http::StatusCode::NO_CONTENT,
    };
    rec.got.lock().unwrap().push(Delivery {
        id: header("credbroker-event-id"),
        signature: header("credbroker-signature"),
        body: body.to_vec(),
        status: status.as_u16(),
    });
    status
}

/// The webhook receiver: HTTPS on a port of its own, under a CA of its own.
pub struct Receiver {
    pub port: u16,
    pub ca: CertAuthority,
    pub rec: Recorder,
    serving: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut receiver = Receiver {
            port: listener.local_addr().unwrap().port(),
            ca: CertAuthority::generate("webhook receiver CA").unwrap(),
            rec: Recorder::default(),
            serving: None,
            dir: tempfile::tempdir().unwrap(),
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/hook/{token}", axum::routing::post(record))
            .with_state(self.rec.clone());
        let acceptor = tls_acceptor(&self.ca);
        self.serving = Some(tokio::spawn(async move {
            // Dropped with this task: taking the receiver down closes every connection too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                connections.spawn(serve_one(acceptor.clone(), tcp, app.clone()));
            }
        }));
    }

    /// Stops listening and drops every open connection.
    pub async fn down(&mut self) {
        if let Some(task) = self.serving.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(listener);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.rec.got.lock().unwrap().clone()
    }

    /// Waits (at most a minute) until a delivery satisfies `done`.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        for _ in 0..600 {
            let got = self.deliveries();
            if done(&got) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {what} within a minute: {:?}", self.deliveries());
    }

    /// The `[[webhooks]]` entry pointing at this receiver (a token in the path, as some
    /// platforms' hook URLs have), with `extra` lines.
    pub fn config(&self, extra: &str) -> String {
        let secret = self.dir.path().join("hook.secret");
        std::fs::write(&secret, format!("{HOOK_SECRET}\n")).unwrap();
        let ca = self.dir.path().join("receiver-ca.pem");
        std::fs::write(&ca, &self.ca.cert_pem).unwrap();
        format!(
            "\n[[webhooks]]\nurl = \"https://127.0.0.1:{}/hook/path-token-canary\"\n\
             secret_file = \"{}\"\nca_file = \"{}\"\n{extra}\n",
            self.port,
            secret.display(),
            ca.display()
        )
    }
}

/// Checks a delivery the way the README tells a receiver to, with HMAC-SHA256 computed here.
pub fn assert_signed(d: &Delivery) {
    let (t, v1) = d
        .signature
        .split_once(',')
        .unwrap_or_else(|| panic!("signature {:?}", d.signature));
    let t: i64 = t.strip_prefix("t=").unwrap().parse().unwrap();
    let v1 = hex::decode(v1.strip_prefix("v1=").unwrap()).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&d.body);
    mac.verify_slice(&v1)
        .expect("the signature matches the body");
    let age = chrono::Utc::now().timestamp() - t;
    assert!(age.abs() <= 300, "outside the replay window: {age}s");
    assert_eq!(
        d.json()["id"],
        d.id.as_str(),
        "the id header is the event's"
    );
    // Another secret does not verify it.
    let mut other = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"not the secret").unwrap();
    other.update(format!("{t}.").as_bytes());
    other.update(&d.body);
    assert!(other.verify_slice(&v1).is_err());
}
