//! wa-pair links WhatsApp accounts to a server by 8-character pairing code.
//!
//! A request flows top to bottom through these modules:
//!
//! - [`config`]: typed settings from the environment (and `.env`).
//! - [`telemetry`]: tracing setup (flat JSON lines in Railway's shape),
//!   redaction of codes and phones.
//! - [`startup`]: builds the service from a [`config::Config`], serves it,
//!   stops it gracefully.
//! - [`http`]: the axum router, handlers, callers (API keys, Supabase
//!   tokens), per-caller rate limits, CORS, request deadlines, the accept
//!   loop with its connection limits, the JSON error type and the OpenAPI
//!   document (`/openapi.json`).
//! - [`phone`]: [`phone::PhoneNumber::parse`], the only way to get a phone
//!   (country codes from libphonenumber, compiled in).
//! - [`session`]: one task per phone: state machine, refresh timer, backoff;
//!   the registry of running sessions (ended ones are read from the store),
//!   who owns each session, and the per-phone code budget.
//! - [`link`]: the `Linker` seam and the real `whatsapp-rust` link client,
//!   each on a runtime that owns (and at the end, stops) its tasks; the warm
//!   pool of connected clients; the sweep of devices set aside by a re-link;
//!   the passkey path's types (`link::passkey`).
//! - [`store`]: where states are kept: in memory, Upstash Redis (REST) or a
//!   Redis server, timed and counted for the metrics; leases, hand-overs
//!   and pub/sub for processes that share it.
//! - [`devices`]: linked devices saved in PostgreSQL (`DATABASE_URL`).
//! - [`metrics`]: the Prometheus metrics served at `/metrics`.
//! - [`retry`]: exponential backoff with full jitter.
//! - [`webhook`]: session outcomes POSTed to `WEBHOOK_URL`, signed as
//!   Standard Webhooks do, retried for up to an hour.

pub mod config;
pub mod devices;
pub mod http;
pub mod link;
pub mod metrics;
pub mod phone;
pub mod retry;
pub mod session;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod webhook;
