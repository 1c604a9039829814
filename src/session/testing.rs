//! Test doubles shared by the session tests: a scripted linker and a store
//! that can be switched off.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::SessionSettings;
use crate::link::passkey::PasskeyAssertion;
use crate::link::{IssuedCode, LinkError, LinkEvent, LinkHandle, Linker, OpenedLink, PairingCode};
use crate::phone::PhoneNumber;
use crate::retry::Backoff;
use crate::store::{
    Counted, HandOver, HeldLease, LeaseStep, MemoryStore, PairingStore, StoreError, Subscription,
    Written,
};

/// WhatsApp's own code validity.
pub(super) const VALIDITY: Duration = Duration::from_secs(180);

#[derive(Default)]
pub(super) struct Script {
    pub(super) results: Mutex<VecDeque<Result<IssuedCode, LinkError>>>,
    pub(super) events: Mutex<Option<mpsc::UnboundedSender<LinkEvent>>>,
    pub(super) valid_for: Mutex<Option<Duration>>,
    /// Code requests and passkey assertions never answer (WhatsApp silent).
    pub(super) hang: AtomicBool,
    /// Opening a link panics (a bug in the client library, say).
    pub(super) panic_on_open: AtomicBool,
    /// Shutting a link down takes this long.
    pub(super) slow_shutdown: Mutex<Duration>,
    /// A linked device of the phone is kept.
    pub(super) linked_device: AtomicBool,
    pub(super) requests: AtomicU32,
    pub(super) opens: AtomicU32,
    pub(super) shutdowns: AtomicU32,
    /// Connections made for QR codes alone.
    pub(super) connects: AtomicU32,
    /// Links ended by discarding the device.
    pub(super) discards: AtomicU32,
    /// What WhatsApp answers the next passkey assertions (then `Ok`).
    pub(super) passkey_answers: Mutex<VecDeque<Result<(), LinkError>>>,
    pub(super) passkeys_sent: AtomicU32,
    pub(super) confirmations: AtomicU32,
}

impl Script {
    pub(super) fn push(&self, result: Result<IssuedCode, LinkError>) {
        self.results.lock().unwrap().push_back(result);
    }
    pub(super) fn emit(&self, event: LinkEvent) {
        let events = self.events.lock().unwrap();
        events.as_ref().expect("session open").send(event).unwrap();
    }
}

pub(super) struct ScriptedLinker(pub(super) Arc<Script>);

#[async_trait]
impl Linker for ScriptedLinker {
    async fn linked_device(&self, _phone: &PhoneNumber) -> Result<Option<Vec<u8>>, LinkError> {
        Ok(self
            .0
            .linked_device
            .load(Ordering::SeqCst)
            .then(|| b"SQLite format 3\0scripted".to_vec()))
    }
    async fn has_linked_device(&self, _phone: &PhoneNumber) -> bool {
        self.0.linked_device.load(Ordering::SeqCst)
    }

    async fn open(&self, _phone: &PhoneNumber) -> Result<OpenedLink, LinkError> {
        self.0.opens.fetch_add(1, Ordering::SeqCst);
        assert!(
            !self.0.panic_on_open.load(Ordering::SeqCst),
            "scripted panic in open"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        *self.0.events.lock().unwrap() = Some(tx);
        Ok(OpenedLink {
            handle: Arc::new(ScriptedHandle(Arc::clone(&self.0))),
            events: rx,
        })
    }
}

pub(super) struct ScriptedHandle(Arc<Script>);

#[async_trait]
impl LinkHandle for ScriptedHandle {
    async fn request_code(&self) -> Result<IssuedCode, LinkError> {
        let n = self.0.requests.fetch_add(1, Ordering::SeqCst) + 1;
        if self.0.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if let Some(result) = self.0.results.lock().unwrap().pop_front() {
            return result;
        }
        Ok(IssuedCode {
            code: PairingCode::new(format!("CODE{n:04}")),
            valid_for: self.0.valid_for.lock().unwrap().unwrap_or(VALIDITY),
        })
    }
    async fn connect(&self) -> Result<(), LinkError> {
        self.0.connects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn shutdown(&self) {
        let pause = *self.0.slow_shutdown.lock().unwrap();
        tokio::time::sleep(pause).await;
        self.0.shutdowns.fetch_add(1, Ordering::SeqCst);
    }
    async fn discard(&self) {
        self.0.discards.fetch_add(1, Ordering::SeqCst);
        self.shutdown().await;
    }
    async fn send_passkey(&self, _assertion: PasskeyAssertion) -> Result<(), LinkError> {
        self.0.passkeys_sent.fetch_add(1, Ordering::SeqCst);
        if self.0.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.0
            .passkey_answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()))
    }
    async fn confirm_passkey(&self) -> Result<(), LinkError> {
        self.0.confirmations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A store that can be switched off.
#[derive(Default)]
pub(super) struct FlakyStore {
    pub(super) inner: MemoryStore,
    pub(super) down: AtomicBool,
}

#[async_trait]
impl PairingStore for FlakyStore {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Server {
                status: 503,
                message: "down".into(),
            });
        }
        self.inner.set(key, value, ttl).await
    }
    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Server {
                status: 503,
                message: "down".into(),
            });
        }
        self.inner.set_state(key, value, seq, ttl, lease).await
    }
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Server {
                status: 503,
                message: "down".into(),
            });
        }
        self.inner.count(key, window).await
    }
    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Timeout);
        }
        self.inner.lease(key, step, ttl).await
    }
    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Timeout);
        }
        self.inner.hand_over(handover).await
    }
    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError> {
        self.inner.handed_over(index).await
    }
    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError> {
        self.inner.unlist(index, phone).await
    }
    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        self.inner.publish(channel, message).await
    }
    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        self.inner.subscribe(channel).await
    }
    fn kind(&self) -> &'static str {
        "flaky"
    }
}

pub(super) fn settings() -> SessionSettings {
    SessionSettings {
        code_ttl: Duration::from_secs(600),
        refresh_every: Duration::from_secs(480),
        session_max: Duration::from_secs(1800),
        outcome_ttl: Duration::from_secs(86_400),
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        max_attempts: 10,
        key_prefix: "wa:pair:".into(),
        codes_per_hour: 1000,
    }
}
