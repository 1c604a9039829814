//! Integration tests: one binary (one link step) for everything that needs
//! the real link client, a fake WhatsApp, a fake Upstash or the HTTP API.

mod api;
mod auth;
#[cfg(feature = "sandbox")]
mod browser;
mod chaos;
mod code_budget;
mod devices;
mod events;
mod fake_strictness;
mod flow_logs;
mod helpers;
mod link_client;
mod log_redaction;
mod metrics;
mod openapi;
mod page;
mod passkey;
#[cfg(feature = "sandbox")]
mod processes;
mod qr;
mod redis_store;
mod replicas;
#[cfg(feature = "sandbox")]
mod sandbox;
mod soak;
mod supabase_auth;
mod upstash_contract;
mod upstash_on_redis;
mod warm;
mod webhook;
