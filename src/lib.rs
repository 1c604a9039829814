//! wa-pair: links WhatsApp accounts to a server by 8-character pairing code.
pub mod config;
pub mod link;
pub mod phone;
pub mod retry;
pub mod store;
pub mod telemetry;
