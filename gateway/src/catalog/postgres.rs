//! Postgres catalog (deadpool-postgres + tokio-postgres) and embedded migrations.
