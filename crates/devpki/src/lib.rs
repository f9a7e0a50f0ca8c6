//! Certificates for development and tests: a CA and the leaf certificates signed by it (the
//! server's, and clients' carrying a SPIFFE ID). Production deployments bring their own PKI;
//! `credbroker dev` uses this to make everything it needs on first run. [`broker`] writes the
//! policy and configuration such a broker runs with, the same for `credbroker dev` and tests.

pub mod broker;

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Who a client certificate names. The broker reads the URI SAN first, then the DNS SAN, then
/// the subject CN (DESIGN.md §1 "caller").
#[derive(Debug, Clone, Default)]
pub struct ClientName {
    pub uri: Option<String>,
    pub dns: Option<String>,
    pub common_name: String,
}

pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertAuthority {
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<CertifiedKey, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("credbroker"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, Duration::days(825), Duration::hours(1))
    }

    /// A client certificate valid from now for `valid_for`.
    pub fn issue_client(
        &self,
        name: &ClientName,
        valid_for: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        self.issue_client_at(name, Duration::hours(1), valid_for)
    }

    /// A client certificate whose validity started `started_ago` and lasts `valid_for` from then
    /// (tests use this for an expired certificate).
    pub fn issue_client_at(
        &self,
        name: &ClientName,
        started_ago: Duration,
        valid_for: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.common_name.as_str());
        if let Some(uri) = &name.uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        if let Some(dns) = &name.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, valid_for, started_ago)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        valid_for: Duration,
        started_ago: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = OffsetDateTime::now_utc() - started_ago;
        params.not_after = params.not_before + valid_for;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The files of a development PKI under one folder.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub const ADMIN_ID: &'static str = "spiffe://credbroker.dev/admin";
    pub const AGENT_ID: &'static str = "spiffe://credbroker.dev/agent-runtime";

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates the CA, the server certificate (localhost, 127.0.0.1) and the admin and agent
    /// client certificates, unless they exist already.
    pub fn ensure(dir: &Path) -> Result<DevPki, PkiError> {
        let pki = DevPki {
            dir: dir.to_path_buf(),
        };
        if pki.path("ca.pem").exists() {
            return Ok(pki);
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PkiError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = CertAuthority::generate("credbroker dev CA")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let year = Duration::days(365);
        let admin = ca.issue_client(
            &ClientName {
                uri: Some(Self::ADMIN_ID.into()),
                dns: None,
                common_name: "admin".into(),
            },
            year,
        )?;
        let agent = ca.issue_client(
            &ClientName {
                uri: Some(Self::AGENT_ID.into()),
                dns: None,
                common_name: "agent-runtime".into(),
            },
            year,
        )?;
        // ca.pem is written last: its presence means the set is complete.
        for (name, pem, private) in [
            ("ca.key", &ca.key_pem, true),
            ("server.pem", &server.cert_pem, false),
            ("server.key", &server.key_pem, true),
            ("admin.pem", &admin.cert_pem, false),
            ("admin.key", &admin.key_pem, true),
            ("agent.pem", &agent.cert_pem, false),
            ("agent.key", &agent.key_pem, true),
            ("ca.pem", &ca.cert_pem, false),
        ] {
            write_file(&pki.path(name), pem.as_bytes(), private).map_err(io(&pki.path(name)))?;
        }
        Ok(pki)
    }
}

/// Writes a file, owner-only when `private`.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
