//! Integration tests against real PostgreSQL servers (see `pgstate-testcluster`): one test
//! binary, so one cluster per `cargo test` process; each test works in its own schema or
//! database, so the tests run in parallel.

mod backup;
mod bad_input;
mod basic_backend;
mod basic_config;
mod cancellation;
mod cancellation_stress;
mod capture;
mod checkpoints;
mod citus;
mod coalescing;
mod conformance;
mod consistency;
mod coordination;
mod exactly_once;
mod expiry;
mod failover;
mod fencing;
mod hostile;
mod leader;
mod lease_lock;
mod listener;
mod lock_sessions;
mod maintenance;
mod memory_backend;
mod observability;
mod ops;
mod partitioning;
mod pgbouncer;
mod pipelining;
mod pool;
mod postgres_backend_enhanced;
mod repartition;
mod replication;
mod schema;
mod security;
mod seed;
mod streams;
mod support;
mod switchover;
mod time_partitions;
mod tls;
mod transaction_drops;
mod transactions;
mod word_count;
