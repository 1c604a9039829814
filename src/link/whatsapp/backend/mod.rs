//! A link client's device store: in memory while the device is pending, on
//! SQLite from the moment it links.
//!
//! A pending device is a handful of keys nobody needs once the session
//! ends, yet a SQLite store for it cost about 450 KiB per open session
//! (connection, page cache, parsed schema) and three file descriptors. So
//! every link client starts on whatsapp-rust's [`InMemoryBackend`], and
//! [`DeviceBackend`] moves it to `DATA_DIR/<phone>.db` the first time the
//! library writes anything that must outlive the session: the device
//! saved as registered (its `pair-success`), or any other record (the
//! identities, sessions, pre-keys and mappings that come with and after a
//! link).
//!
//! Why this loses nothing: until that first write, the only thing the
//! library keeps in the store is the device itself (its keys), so moving
//! is copying the device; the write that triggered the move, and every one
//! after it, goes to SQLite. Deletions while pending stay in memory: there
//! is nothing on disk they could concern. The move holds the store's lock,
//! so no write can slip into memory while it runs.
//!
//! `delegation.rs` implements the library's store traits by handing each
//! call to the current phase: reads as they are, lasting writes through
//! the move.

mod delegation;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::sync::{RwLock, RwLockReadGuard};
use wacore::store::InMemoryBackend;
use wacore::store::error::{Result, StoreError};
use wacore::store::traits::{Backend, DeviceStore};
use whatsapp_rust_sqlite_storage::SqliteStore;

use super::DEVICE_ID;
use super::files::remove_device_files;

/// Where a device's keys live now.
enum Phase {
    /// Not linked: nothing on disk.
    Pending(InMemoryBackend),
    /// Linked (or about to be): the phone's SQLite file.
    OnDisk(SqliteStore),
    /// The session ended and the SQLite file is closed: reads find
    /// nothing, lasting writes are refused.
    Closed(InMemoryBackend),
}

impl Phase {
    fn backend(&self) -> &dyn Backend {
        match self {
            Phase::Pending(memory) | Phase::Closed(memory) => memory,
            Phase::OnDisk(sqlite) => sqlite,
        }
    }
}

/// A link client's device store (see the module documentation).
pub(super) struct DeviceBackend {
    phase: RwLock<Phase>,
    /// The SQLite file the device moves to; known once a phone claims the
    /// client (at once on the cold path, at `take` for a warm client).
    home: OnceLock<PathBuf>,
}

impl std::fmt::Debug for DeviceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBackend")
            .field("home", &self.home.get())
            .finish_non_exhaustive()
    }
}

impl DeviceBackend {
    /// A fresh, empty store in memory; [`Self::set_home`] says where it
    /// goes once linked.
    pub fn pending() -> Arc<Self> {
        Arc::new(Self {
            phase: RwLock::new(Phase::Pending(InMemoryBackend::new())),
            home: OnceLock::new(),
        })
    }

    /// Where the device's SQLite file goes. The first call wins: a client
    /// belongs to one phone.
    pub fn set_home(&self, home: PathBuf) {
        let _ = self.home.set(home);
    }

    /// Whether the device has moved to its SQLite file.
    pub async fn is_on_disk(&self) -> bool {
        matches!(&*self.phase.read().await, Phase::OnDisk(_))
    }

    /// Lets go of the device (and closes its SQLite file, once nothing else
    /// uses the store): the owner calls it when its client has stopped. A
    /// device that never `linked` is of no use to anyone: if it reached its
    /// file (a link that failed half-way, `pair-success` never came
    /// through), the file is deleted.
    pub async fn close(&self, linked: bool) {
        *self.phase.write().await = Phase::Closed(InMemoryBackend::new());
        if !linked && let Some(home) = self.home.get() {
            remove_device_files(home).await;
        }
    }

    async fn read(&self) -> RwLockReadGuard<'_, Phase> {
        self.phase.read().await
    }

    /// The store a write that must last goes to: SQLite, moving the device
    /// there first if it is still in memory.
    async fn for_write(&self, operation: &'static str) -> Result<RwLockReadGuard<'_, Phase>> {
        {
            let phase = self.phase.read().await;
            if matches!(&*phase, Phase::OnDisk(_)) {
                return Ok(phase);
            }
        }
        let mut phase = self.phase.write().await;
        if matches!(&*phase, Phase::Closed(_)) {
            return Err(StoreError::Validation(format!(
                "{operation}: the device store is closed"
            )));
        }
        if let Phase::Pending(memory) = &*phase {
            let sqlite = self.open_home(operation).await?;
            if let Some(device) = memory.load().await? {
                sqlite.save(&device).await?;
            }
            *phase = Phase::OnDisk(sqlite);
        }
        Ok(phase.downgrade())
    }

    /// Saving the device: a registered one (it linked) must last, an
    /// unregistered one stays in memory.
    async fn for_save(&self, device: &wacore::store::Device) -> Result<RwLockReadGuard<'_, Phase>> {
        if device.is_registered() {
            self.for_write("save a registered device").await
        } else {
            Ok(self.read().await)
        }
    }

    async fn open_home(&self, operation: &'static str) -> Result<SqliteStore> {
        let Some(home) = self.home.get() else {
            // Only a phone's link can produce lasting data; a client no
            // phone has claimed has none to write.
            tracing::error!(operation, "a link client with no phone wrote device data");
            return Err(StoreError::Validation(format!(
                "{operation}: the device has no phone to be stored for"
            )));
        };
        let path = home
            .to_str()
            .ok_or_else(|| StoreError::Validation(format!("non UTF-8 path {home:?}")))?;
        tracing::debug!(operation, "device linked: moving its store to disk");
        SqliteStore::new_for_device(path, DEVICE_ID).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wacore::store::Device;
    use wacore::store::traits::{ProtocolStore, SignalStore};

    fn registered(mut device: Device) -> Device {
        device.pn = Some("6281234567890@s.whatsapp.net".parse().expect("jid"));
        device
    }

    /// A pending store with `home` in `dir`, holding a fresh device as the
    /// library saves it when a client is built.
    async fn pending_in(dir: &std::path::Path) -> (Arc<DeviceBackend>, Device, PathBuf) {
        let backend = DeviceBackend::pending();
        let home = dir.join("6281234567890.db");
        backend.set_home(home.clone());
        let device = Device::new();
        backend.save(&device).await.expect("save");
        (backend, device, home)
    }

    async fn on_disk(home: &std::path::Path) -> SqliteStore {
        SqliteStore::new_for_device(home.to_str().expect("UTF-8"), DEVICE_ID)
            .await
            .expect("open")
    }

    #[tokio::test]
    async fn a_pending_device_has_no_file_until_it_is_saved_as_registered() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let (backend, device, home) = pending_in(dir.path()).await;
        assert!(!home.exists(), "an unregistered device stays in memory");
        assert!(!backend.is_on_disk().await);

        // Act
        backend.save(&registered(device.clone())).await.unwrap();

        // Assert
        assert!(backend.is_on_disk().await);
        let stored = on_disk(&home).await.load().await.unwrap().expect("device");
        assert!(stored.is_registered());
        assert_eq!(
            stored.identity_key.public_key.public_key_bytes(),
            device.identity_key.public_key.public_key_bytes()
        );
        assert_eq!(
            stored.noise_key.public_key.public_key_bytes(),
            device.noise_key.public_key.public_key_bytes()
        );
    }

    #[tokio::test]
    async fn any_other_lasting_write_moves_the_device_to_disk_with_its_keys_first() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let (backend, device, home) = pending_in(dir.path()).await;

        // Act
        backend
            .put_identity("6281234567890.0", [7; 32])
            .await
            .unwrap();

        // Assert
        let sqlite = on_disk(&home).await;
        assert_eq!(
            sqlite.load_identity("6281234567890.0").await.unwrap(),
            Some([7; 32])
        );
        let stored = sqlite.load().await.unwrap().expect("device copied");
        assert_eq!(stored.registration_id, device.registration_id);
        assert_eq!(
            backend.load_identity("6281234567890.0").await.unwrap(),
            Some([7; 32]),
            "reads follow the device to disk"
        );
    }

    #[tokio::test]
    async fn deletions_while_pending_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _, home) = pending_in(dir.path()).await;

        backend.delete_session("6281234567890.0").await.unwrap();
        backend.delete_expired_tc_tokens(0, 0).await.unwrap();

        assert!(!home.exists());
        assert!(!backend.is_on_disk().await);
    }

    #[tokio::test]
    async fn a_closed_store_lets_go_of_its_file_and_refuses_lasting_writes() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let (backend, device, home) = pending_in(dir.path()).await;
        backend.save(&registered(device)).await.unwrap();

        // Act
        backend.close(true).await;

        // Assert
        assert!(!backend.is_on_disk().await);
        assert!(
            backend
                .put_identity("6281234567890.0", [7; 32])
                .await
                .is_err()
        );
        assert!(backend.load().await.unwrap().is_none());
        assert!(
            on_disk(&home).await.load().await.unwrap().is_some(),
            "the file keeps the linked device"
        );
    }

    #[tokio::test]
    async fn closing_a_device_that_never_linked_deletes_the_file_it_reached() {
        // Arrange: the device reached its file, but the link never completed.
        let dir = tempfile::tempdir().unwrap();
        let (backend, device, home) = pending_in(dir.path()).await;
        backend.save(&registered(device)).await.unwrap();
        assert!(home.exists());

        // Act
        backend.close(false).await;

        // Assert
        assert!(!home.exists());
    }

    #[tokio::test]
    async fn a_client_no_phone_has_claimed_refuses_lasting_writes_and_stays_in_memory() {
        let backend = DeviceBackend::pending();
        backend.save(&Device::new()).await.unwrap();

        let refused = backend.put_identity("6281234567890.0", [7; 32]).await;

        assert!(refused.is_err());
        assert!(!backend.is_on_disk().await);
    }
}
