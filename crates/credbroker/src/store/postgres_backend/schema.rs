//! The PostgreSQL schema of the store, versioned: `credbroker init` and `serve` create it and
//! migrate it forward; a schema newer than this build is refused, never touched.
//!
//! Invariants:
//! - every table lives in the configured PostgreSQL schema; `schema_version` holds one row,
//!   the number of [`MIGRATIONS`] applied;
//! - migrations run in one transaction under an advisory lock, so replicas starting together
//!   migrate once and none sees a half-migrated schema;
//! - a migration is only ever appended to [`MIGRATIONS`], never edited.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::store::{Intent, StoreError};

/// Each migration's SQL, `{s}` standing for the schema. Version N is the first N applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: records (ordered by key as unsigned bytes, which is how bytea compares) and metadata
    // (text in byte order: the "C" collation).
    "CREATE TABLE {s}.records (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.meta (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL);",
    // 2: what replicas agree through (leases, counters, change notifications).
    crate::store::pg_coord::MIGRATION,
];

/// Whether `name` may name the schema: a plain lower-case SQL identifier (never quoted).
pub fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Checks what `schema` holds against `intent`, then creates or migrates it.
pub async fn prepare(
    client: &mut Client,
    schema: &str,
    intent: Intent,
    location: &str,
) -> Result<(), StoreError> {
    let error = |e| super::pg_error(location, e);
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass(quote_ident($1) || '.schema_version') IS NOT NULL",
            &[(&schema, Type::TEXT)],
        )
        .await
        .map_err(error)?
        .get(0);
    match intent {
        Intent::Existing if !exists => {
            return Err(StoreError::NotInitialized {
                path: location.to_string(),
            });
        }
        Intent::Empty if exists && holds_anything(client, schema, location).await? => {
            return Err(StoreError::NotEmpty {
                path: location.to_string(),
            });
        }
        _ => {}
    }
    migrate(client, schema, location).await
}

async fn holds_anything(client: &Client, schema: &str, location: &str) -> Result<bool, StoreError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.records) OR EXISTS (SELECT 1 FROM {schema}.meta)"
    );
    let row = client
        .query_typed_one(&sql, &[])
        .await
        .map_err(|e| super::pg_error(location, e))?;
    Ok(row.get(0))
}

/// Applies the migrations `schema` lacks, in one transaction under an advisory lock.
async fn migrate(client: &mut Client, schema: &str, location: &str) -> Result<(), StoreError> {
    let error = |e| super::pg_error(location, e);
    let tx = client.transaction().await.map_err(error)?;
    let lock = format!("credbroker migrate {schema}");
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[(&lock, Type::TEXT)],
    )
    .await
    .map_err(error)?;
    // (No NOTICE for what exists already: every start comes here.)
    tx.batch_execute(&format!(
        "SET LOCAL client_min_messages = warning;
         CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version integer NOT NULL);"
    ))
    .await
    .map_err(error)?;
    let found: Option<i32> = tx
        .query_typed_opt(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .map_err(error)?
        .map(|row| row.get(0));
    let found = found.unwrap_or(0);
    let known = MIGRATIONS.len() as i32;
    if found > known {
        return Err(StoreError::SchemaTooNew {
            location: location.to_string(),
            found,
            known,
        });
    }
    for migration in &MIGRATIONS[found as usize..] {
        tx.batch_execute(&migration.replace("{s}", schema))
            .await
            .map_err(error)?;
    }
    if found < known {
        tx.batch_execute(&format!(
            "DELETE FROM {schema}.schema_version; INSERT INTO {schema}.schema_version VALUES ({known});"
        ))
        .await
        .map_err(error)?;
        tracing::info!(%location, from = found, to = known, "migrated the PostgreSQL schema");
    }
    tx.commit().await.map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["credbroker", "_x", "cb_2"] {
            assert!(valid_schema_name(good), "{good}");
        }
        for bad in [
            "",
            "2cb",
            "Credbroker",
            "a-b",
            "a;drop",
            "x\"y",
            &"a".repeat(64),
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }
}
