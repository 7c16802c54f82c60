//! # sidecache
//!
//! A caching sidecar for Redis. Applications point their Redis URL at it; it speaks RESP2 and
//! RESP3 and forwards every command to a real Redis, behaving exactly like Redis would.
//!
//! ## The request flow, top-down
//!
//! 1. [`server`] accepts a client (within `max_clients`) and starts a [`session`].
//! 2. The session's reader reads what the client sent and [`protocol::request`] frames it into
//!    commands, within limits (bulk size, argument count, inline length, deadline).
//! 3. [`command`] classifies each: stateless, connection state (`SELECT`, `AUTH`, `HELLO`,
//!    `CLIENT SETNAME`), transaction, pub/sub, blocking, or refused by policy.
//! 4. Plain reads of cached keys are answered by the [`cache`] (kept coherent by its
//!    invalidation link) or filled from Redis; writes invalidate their keys before and after
//!    they run, and [`ttl`] gives key-creating writes their prefix's default TTL.
//! 5. The session answers locally, queues stateless commands on a multiplexed [`upstream`]
//!    connection shared by every client with the same (user, database, protocol), or uses a
//!    dedicated connection when the semantics need one (`MULTI`, `SUBSCRIBE`, `BLPOP`…).
//! 6. Replies come back as the exact bytes Redis sent, framed by [`protocol::reply`]; the
//!    session's writer puts them back in request order and writes each batch in one write.
//!    Replies to sidecache's own `LOCK.*` and `SERIAL.NEXT` come from [`locks`], in order too.
//! 7. [`metrics`] counts everything; [`admin`] serves `/metrics`, `/livez` and `/readyz`.
//!
//! [`config`] loads and validates the configuration; `main.rs` is only CLI, config and signals.

pub mod admin;
pub mod cache;
pub mod command;
pub mod config;
pub mod locks;
pub mod metrics;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod session;
pub mod signal;
pub mod ttl;
pub mod upstream;

pub use config::Config;
pub use server::{ReloadHandle, Server};
