//! vncgate: an edge proxy for VNC farms, built on Cloudflare's Pingora.
//!
//! A browser running noVNC connects over `ws://` or `wss://` with a JWT; vncgate verifies the
//! token, pins the session to one VNC backend, and relays RFB both ways with backpressure.
//!
//! The path of one connection, top to bottom (see `ARCHITECTURE.md` in `docs/`):
//!
//! - [`gateway`]: the Pingora app. Reads the HTTP request, serves static files and 404s,
//!   validates the WebSocket handshake, and drives the steps below in order; it owns the one
//!   table that maps every refusal to an HTTP status and contract error code ([`gateway::refusal`]).
//! - [`auth`]: where the token comes from (header, subprotocol, query, cookie) and whether it is
//!   valid (signature with a configured algorithm, `exp`/`nbf`/`iss`/`aud`), plus the claims.
//! - [`admission`]: global and per-user session limits, taken before any backend work.
//! - [`routing`]: which backend a session goes to: the [`routing::SessionStore`] pin (claim or
//!   reuse), owner binding, least-loaded placement over every replica's sessions, backend health,
//!   and the backends found at run time (registered through the admin API, or named by the token
//!   and looked up in DNS).
//! - [`bridge`]: after the 101, the only code that touches payload bytes: WebSocket <-> TCP (or
//!   WebSocket pass-through), bounded buffers, ping/pong, close codes.
//! - [`sessions`]: the registry of live sessions and their control handles, so drain, kick,
//!   revocation and expiry reach each one; [`control`] carries kicks and revocations to every
//!   replica.
//! - [`recording`]: session recordings (FBS files plus a `.jsonl` audit beside them), written by
//!   a task per recording so the relay never waits on the disk; retention, `recording verify`,
//!   and `recording export` (the RFB stream decoded into a PNG).
//! - [`metrics`] and [`telemetry`]: the contract's Prometheus metrics and JSON logs.
//! - [`config`]: file schema, validation with key paths, and the resolved [`config::Config`].
//! - [`server`]: builds Pingora's `Server` from the config and runs it; [`cli`] is the command line.

pub mod admission;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod gateway;
pub mod metrics;
pub mod readiness;
pub mod recording;
pub mod rfb;
pub mod routing;
pub mod server;
pub mod services;
pub mod sessions;
pub mod telemetry;
