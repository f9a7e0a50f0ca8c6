//! A caller's identity from its (already verified) client certificate: the URI SAN (a SPIFFE
//! ID), else the first DNS SAN, else the subject CN.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Caller;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the client certificate does not parse: {0}")]
    Unparsable(String),
    #[error("the client certificate names no identity (no URI SAN, DNS SAN or CN)")]
    Anonymous,
}

pub fn caller_from_cert(der: &[u8]) -> Result<Caller, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| {
        if let GeneralName::URI(u) = n {
            Some(u.to_string())
        } else {
            None
        }
    });
    let dns = || {
        sans.iter().find_map(|n| {
            if let GeneralName::DNSName(d) = n {
                Some(d.to_string())
            } else {
                None
            }
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    };
    uri.or_else(dns)
        .or_else(cn)
        .filter(|id| !id.is_empty())
        .map(|id| Caller { id })
        .ok_or(IdentityError::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use credbroker_devpki::{CertAuthority, ClientName};

    fn der_of(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn uri_then_dns_then_cn() {
        let ca = CertAuthority::generate("test").unwrap();
        let year = time::Duration::days(1);
        let all = ClientName {
            uri: Some("spiffe://x/agent".into()),
            dns: Some("agent.local".into()),
            common_name: "cn".into(),
        };
        let cert = ca.issue_client(&all, year).unwrap();
        assert_eq!(
            caller_from_cert(&der_of(&cert.cert_pem)).unwrap().id,
            "spiffe://x/agent"
        );
        let dns = ClientName {
            uri: None,
            ..all.clone()
        };
        let cert = ca.issue_client(&dns, year).unwrap();
        assert_eq!(
            caller_from_cert(&der_of(&cert.cert_pem)).unwrap().id,
            "agent.local"
        );
        let cn = ClientName {
            uri: None,
            dns: None,
            common_name: "cn-only".into(),
        };
        let cert = ca.issue_client(&cn, year).unwrap();
        assert_eq!(
            caller_from_cert(&der_of(&cert.cert_pem)).unwrap().id,
            "cn-only"
        );
    }
}
