//! Binding an account link to the browser that started it, and checking who answered.
//!
//! BeginConnect's `authorization_url` is the broker's start link (`/oauth/start?state=…`). The
//! first browser to open it gets a random cookie ([`COOKIE`]: `__Host-`, Secure, HttpOnly,
//! SameSite=Lax) and is sent on to the provider; the pending state keeps the SHA-256 of that
//! cookie. The callback finishes the link only for a browser presenting it.
//!
//! Invariants:
//! - the cookie value is never in a URL, a log, an audit record or the store (only its hash);
//! - a start link binds one browser: another browser opening it is refused, and so is a
//!   callback without the bound cookie — neither consumes the state, so the rightful browser
//!   can still finish;
//! - RFC 9207: where an authorization response names its issuer (`iss`) it must be the expected
//!   one — `config.issuer` exactly, or by default the origin of the authorization endpoint; with
//!   `config.issuer` set, a response without `iss` is refused too.

use sha2::Digest;

use super::OAuthError;
use super::catalog::Endpoints;

/// The binding cookie. `__Host-`: set by the broker's own origin only, over HTTPS, for `/`.
pub const COOKIE: &str = "__Host-credbroker-link";

/// The broker's start link and callback, below its public URL.
pub const START_PATH: &str = "/oauth/start";
pub const CALLBACK_PATH: &str = "/oauth/callback";

/// A fresh cookie value: 32 random bytes, hex.
pub fn new_cookie() -> String {
    hex::encode(crate::vault::random_bytes::<32>())
}

/// Whether a value looks like one [`new_cookie`] made (a browser's cookie is reused across
/// links only if it does).
pub fn well_formed(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the pending state keeps of a cookie.
pub fn digest(value: &str) -> String {
    hex::encode(sha2::Sha256::digest(value.as_bytes()))
}

/// Whether `cookie` is the one whose digest is `bound` (compared in constant time).
pub fn matches(bound: &str, cookie: Option<&str>) -> bool {
    let Some(cookie) = cookie.filter(|c| well_formed(c)) else {
        return false;
    };
    crate::vault::constant_time_eq(digest(cookie).as_bytes(), bound.as_bytes())
}

/// The binding cookie's value in a request's `Cookie` headers, if any.
pub fn from_headers<'h>(headers: impl IntoIterator<Item = &'h str>) -> Option<&'h str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// The `Set-Cookie` value that binds a browser for as long as a state lives.
pub fn set_cookie(value: &str) -> String {
    let max_age = super::flow::STATE_TTL.num_seconds();
    format!("{COOKIE}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax")
}

/// RFC 9207: checks the `iss` an authorization response carried against the pinned endpoints.
pub fn check_issuer(endpoints: &Endpoints, iss: Option<&str>) -> Result<(), OAuthError> {
    let iss = iss.filter(|i| !i.is_empty());
    let mismatch = |expected: String| OAuthError::IssuerMismatch {
        expected,
        got: iss.map(shown).unwrap_or_else(|| "none".into()),
    };
    match (&endpoints.issuer, iss) {
        (Some(expected), Some(got)) if got == expected => Ok(()),
        (Some(expected), _) => Err(mismatch(expected.clone())),
        (None, None) => Ok(()),
        (None, Some(got)) => {
            let origin = |url: &str| {
                reqwest::Url::parse(url)
                    .ok()
                    .map(|u| u.origin())
                    .filter(|o| o.is_tuple())
                    .map(|o| o.ascii_serialization())
            };
            let expected = endpoints.auth_url.as_deref().and_then(origin);
            match expected {
                Some(expected) if origin(got).as_ref() == Some(&expected) => Ok(()),
                expected => Err(mismatch(expected.unwrap_or_default())),
            }
        }
    }
}

/// An issuer a response named, as it may appear in an error, a page or the audit: it is the
/// sender's text, so bounded and printable.
fn shown(iss: &str) -> String {
    iss.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(issuer: Option<&str>, auth_url: &str) -> Endpoints {
        let mut config = vec![
            ("client_id", "c"),
            ("auth_url", auth_url),
            ("token_url", "https://as.test/token"),
        ];
        if let Some(issuer) = issuer {
            config.push(("issuer", issuer));
        }
        let connector = crate::model::Connector::for_tests(
            crate::model::Kind::Oauth2,
            crate::model::Mode::Personal,
            &config,
        );
        Endpoints::of(&connector).unwrap()
    }

    #[test]
    fn iss_is_checked_where_sent_and_required_where_configured() {
        let plain = endpoints(None, "https://as.test/oauth/authorize");
        assert!(check_issuer(&plain, None).is_ok());
        assert!(check_issuer(&plain, Some("")).is_ok());
        assert!(check_issuer(&plain, Some("https://as.test")).is_ok());
        // An issuer with a path on the authorization endpoint's origin (Microsoft's tenants).
        assert!(check_issuer(&plain, Some("https://as.test/tenant/v2.0")).is_ok());
        for wrong in [
            "https://evil.test",
            "https://as.test.evil.test",
            "http://as.test",
            "https://as.test:8443",
            "as.test",
        ] {
            let err = check_issuer(&plain, Some(wrong)).unwrap_err();
            assert!(
                matches!(&err, OAuthError::IssuerMismatch { expected, .. } if expected == "https://as.test"),
                "{wrong}: {err}"
            );
        }
        let pinned = endpoints(Some("https://as.test/issuer"), "https://as.test/a");
        assert!(check_issuer(&pinned, Some("https://as.test/issuer")).is_ok());
        for wrong in [
            None,
            Some(""),
            Some("https://as.test"),
            Some("https://evil.test"),
        ] {
            assert!(check_issuer(&pinned, wrong).is_err(), "{wrong:?}");
        }
        // What the sender wrote is shown bounded and printable.
        let noisy = format!("https://evil.test/\n{}", "x".repeat(1000));
        let err = check_issuer(&plain, Some(&noisy)).unwrap_err().to_string();
        assert!(!err.contains('\n') && err.len() < 400, "{err}");
    }

    #[test]
    fn the_cookie_is_found_matched_and_set_with_its_attributes() {
        let value = new_cookie();
        assert!(well_formed(&value));
        let bound = digest(&value);
        assert!(matches(&bound, Some(&value)));
        assert!(!matches(&bound, Some(&new_cookie())));
        assert!(!matches(&bound, None));
        assert!(!matches(&bound, Some(&bound)), "the digest is no cookie");
        assert!(!crate::vault::constant_time_eq(b"ab", b"abc"));
        assert!(crate::vault::constant_time_eq(b"abc", b"abc"));
        let header = format!("a=b; {COOKIE}={value}; c=d");
        assert_eq!(from_headers(["x=y", header.as_str()]), Some(value.as_str()));
        assert_eq!(from_headers(["credbroker-link=zz"]), None);
        let set = set_cookie(&value);
        for attribute in [
            "Secure",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=600",
        ] {
            assert!(set.contains(attribute), "{set}");
        }
    }
}
