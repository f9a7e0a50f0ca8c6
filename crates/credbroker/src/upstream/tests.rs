use super::*;

fn policy(allow: &[&str], deny: &[&str]) -> Policy {
    Policy::new(&EgressConfig {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
        default: Fallback::Allow,
    })
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_built_in_deny_covers_internal_addresses_in_every_form() {
    let p = policy(&[], &[]);
    for (addr, rule) in [
        ("127.0.0.1", "built-in deny 127.0.0.0/8 (loopback)"),
        ("127.8.9.10", "built-in deny 127.0.0.0/8 (loopback)"),
        ("::1", "built-in deny ::1/128 (loopback)"),
        ("::ffff:127.0.0.1", "built-in deny 127.0.0.0/8 (loopback)"),
        (
            "169.254.169.254",
            "built-in deny 169.254.0.0/16 (link-local)",
        ),
        (
            "::ffff:169.254.169.254",
            "built-in deny 169.254.0.0/16 (link-local)",
        ),
        ("10.1.2.3", "built-in deny 10.0.0.0/8 (private)"),
        ("172.31.255.255", "built-in deny 172.16.0.0/12 (private)"),
        ("192.168.0.1", "built-in deny 192.168.0.0/16 (private)"),
        ("fd00::1", "built-in deny fc00::/7 (unique-local)"),
        ("fe80::1", "built-in deny fe80::/10 (link-local)"),
        ("0.0.0.0", "built-in deny 0.0.0.0/8 (unspecified)"),
        ("::", "built-in deny ::/128 (unspecified)"),
        ("224.0.0.1", "built-in deny 224.0.0.0/4 (multicast)"),
        ("ff02::1", "built-in deny ff00::/8 (multicast)"),
        ("::127.0.0.1", "built-in deny ::/96 (IPv4-compatible)"),
    ] {
        assert_eq!(p.check("h", ip(addr)), Err(rule.to_string()), "{addr}");
    }
    for public in [
        "93.184.215.14",
        "172.32.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
    ] {
        assert_eq!(p.check("h", ip(public)), Ok(()), "{public}");
    }
}

#[test]
fn deny_beats_allow_which_beats_the_built_in_deny() {
    let p = policy(
        &["127.0.0.0/8", "mail.corp.example", "*.corp.example"],
        &["127.0.0.2", "*.evil.example"],
    );
    assert_eq!(p.check("x", ip("127.0.0.1")), Ok(()));
    assert_eq!(p.check("x", ip("::ffff:127.0.0.1")), Ok(()));
    assert_eq!(p.check("x", ip("127.0.0.2")), Err("deny 127.0.0.2".into()));
    assert_eq!(p.check("MAIL.corp.example.", ip("10.0.0.1")), Ok(()));
    assert_eq!(p.check("a.b.corp.example", ip("10.0.0.1")), Ok(()));
    assert!(p.check("corp.example", ip("10.0.0.1")).is_err());
    assert!(p.check("xcorp.example", ip("10.0.0.1")).is_err());
    assert_eq!(
        p.check("x.evil.example", ip("8.8.8.8")),
        Err("deny *.evil.example".into())
    );
    let closed = Policy::new(&EgressConfig {
        allow: vec!["*.corp.example".into()],
        default: Fallback::Deny,
        ..EgressConfig::default()
    })
    .unwrap();
    assert!(closed.check("example.com", ip("8.8.8.8")).is_err());
    assert_eq!(closed.check("a.corp.example", ip("8.8.8.8")), Ok(()));
}

#[test]
fn bad_rules_are_named() {
    for (bad, why) in [
        ("10.0.0.0/33", "the prefix must be 0-32"),
        ("10.0.0/8", "is not an address or CIDR"),
        (
            "exa mple.com",
            "is not a CIDR, an address or a host pattern",
        ),
        ("*.", "is not a CIDR"),
    ] {
        let e = Policy::new(&EgressConfig {
            deny: vec![bad.into()],
            ..EgressConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("[egress] deny") && e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_name_keeps_only_its_allowed_addresses_and_a_refusal_names_address_and_rule() {
    let p = policy(&[], &[]);
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(
        p.filter("m.example", [a("127.0.0.1:993"), a("8.8.8.8:993")]),
        Ok(vec![a("8.8.8.8:993")])
    );
    let refused = p.filter("localhost", [a("127.0.0.1:993")]).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "upstream localhost (127.0.0.1:993) refused by egress rule built-in deny 127.0.0.0/8 (loopback)"
    );
    let literal = p.filter("127.0.0.1", [a("127.0.0.1:993")]).unwrap_err();
    assert_eq!(
        literal.to_string(),
        "upstream 127.0.0.1:993 refused by egress rule built-in deny 127.0.0.0/8 (loopback)"
    );
}

#[tokio::test]
async fn caps_refuse_over_the_limit_and_give_back_on_drop() {
    let caps = Arc::new(Caps::new(3, 2));
    let a1 = caps.take(Some("a".into())).unwrap();
    let _a2 = caps.take(Some("a".into())).unwrap();
    let busy = caps.take(Some("a".into())).unwrap_err();
    assert!(
        busy.to_string().contains("for caller a (at most 2)"),
        "{busy}"
    );
    let _b = caps.take(Some("b".into())).unwrap();
    let full = caps.take(None).unwrap_err();
    assert!(
        full.to_string()
            .contains("for the whole broker (at most 3)"),
        "{full}"
    );
    // A refusal by the caller cap took nothing from the overall one.
    drop(a1);
    let _a3 = caps.take(Some("a".into())).unwrap();
    assert!(caps.take(Some("c".into())).is_err());
    drop(_b);
    assert!(caps.take(Some("c".into())).is_ok());
    assert_eq!(caps.per_caller.lock().unwrap().get("c"), None);
}

#[tokio::test]
async fn a_guarded_http_client_refuses_ip_literals_and_internal_names() {
    crate::tls::install_crypto_provider();
    let client = http::guard(reqwest::Client::builder()).build().unwrap();
    for (url, target) in [
        ("https://127.0.0.1:1/token", "upstream 127.0.0.1:1 refused"),
        ("https://[::1]:2/", "upstream [::1]:2 refused"),
        (
            "https://169.254.169.254/latest",
            "upstream 169.254.169.254:443 refused",
        ),
        (
            "https://localhost:3/",
            "upstream localhost (127.0.0.1) refused",
        ),
    ] {
        let e = client.get(url).send().await.unwrap_err();
        let cause = refusal(&e).unwrap_or_else(|| panic!("{url}: no egress cause in {e:?}"));
        assert!(cause.to_string().starts_with(target), "{url}: {cause}");
    }
}

#[test]
fn the_egress_section_parses_and_refuses_unknown_keys() {
    let config: EgressConfig = toml::from_str(
        "allow = [\"10.1.0.0/16\"]\ndeny = [\"*.evil.example\"]\ndefault = \"deny\"\n",
    )
    .unwrap();
    let p = Policy::new(&config).unwrap();
    assert_eq!(p.check("a", ip("10.1.2.3")), Ok(()));
    assert!(
        p.check("a", ip("8.8.8.8"))
            .unwrap_err()
            .contains("default deny")
    );
    assert!(toml::from_str::<EgressConfig>("allowed = []").is_err());
    assert!(toml::from_str::<EgressConfig>("default = \"maybe\"").is_err());
}
