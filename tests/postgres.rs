//! The PostgreSQL backend against a real server (the `postgres` test peer, over TLS): the
//! store conformance suite (the same one sled passes), the durability and secrecy checks of
//! opening, and the behaviour while the server is down.

mod support;

use credbroker::config::StoreConfig;
use credbroker::store::PgUrl;
use credbroker::store::tests::Fixture;
use support::postgres::{Postgres, postgres};

/// Each fixture's stores live in PostgreSQL schemas of their own in the shared server.
struct PgFixture {
    id: String,
}

impl PgFixture {
    fn new() -> Self {
        let mut bytes = [0u8; 6];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .unwrap();
        PgFixture {
            id: hex::encode(bytes),
        }
    }
}

/// A `[store]` selecting `pg`, in PostgreSQL schema `schema`.
fn store_config(pg: &Postgres, schema: &str) -> StoreConfig {
    let mut config = StoreConfig::at("/nonexistent/credbroker-local-state".into());
    config.backend = "postgres".into();
    config.url = Some(PgUrl::new(pg.url()));
    config.password_file = Some(pg.password_file());
    config.ca_file = Some(pg.ca_file());
    config.schema = schema.into();
    config.pool_size = 4;
    config
}

impl Fixture for PgFixture {
    fn config_at(&self, name: &str) -> StoreConfig {
        store_config(postgres(), &format!("t{}_{name}", self.id))
    }
}

credbroker::conformance_suite!(conformance, super::PgFixture::new());
