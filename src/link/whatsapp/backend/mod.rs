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

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{RwLock, RwLockReadGuard};
use wacore::appstate::hash::HashState;
use wacore::appstate::processor::AppStateMutationMAC;
use wacore::store::InMemoryBackend;
use wacore::store::error::{Result, StoreError};
use wacore::store::traits::*;
use whatsapp_rust_sqlite_storage::SqliteStore;

use super::DEVICE_ID;

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
    /// uses the store): the owner calls it when its client has stopped.
    pub async fn close(&self) {
        *self.phase.write().await = Phase::Closed(InMemoryBackend::new());
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

#[async_trait]
impl SignalStore for DeviceBackend {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.for_write("put_identity")
            .await?
            .backend()
            .put_identity(address, key)
            .await
    }
    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        self.for_write("put_identities_batch")
            .await?
            .backend()
            .put_identities_batch(identities)
            .await
    }
    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        self.read().await.backend().load_identity(address).await
    }
    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.read().await.backend().delete_identity(address).await
    }
    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        self.read().await.backend().get_session(address).await
    }
    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.for_write("put_session")
            .await?
            .backend()
            .put_session(address, session)
            .await
    }
    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        self.for_write("put_sessions_batch")
            .await?
            .backend()
            .put_sessions_batch(sessions)
            .await
    }
    async fn delete_session(&self, address: &str) -> Result<()> {
        self.read().await.backend().delete_session(address).await
    }
    async fn has_session(&self, address: &str) -> Result<bool> {
        self.read().await.backend().has_session(address).await
    }
    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        self.read()
            .await
            .backend()
            .has_signal_state_for_user(user)
            .await
    }
    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.for_write("store_prekey")
            .await?
            .backend()
            .store_prekey(id, record, uploaded)
            .await
    }
    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        self.for_write("store_prekeys_batch")
            .await?
            .backend()
            .store_prekeys_batch(keys, uploaded)
            .await
    }
    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        self.read().await.backend().load_prekey(id).await
    }
    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        self.read().await.backend().load_prekeys_batch(ids).await
    }
    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        self.for_write("mark_prekeys_uploaded")
            .await?
            .backend()
            .mark_prekeys_uploaded(ids)
            .await
    }
    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.read().await.backend().remove_prekey(id).await
    }
    async fn get_max_prekey_id(&self) -> Result<u32> {
        self.read().await.backend().get_max_prekey_id().await
    }
    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.for_write("store_signed_prekey")
            .await?
            .backend()
            .store_signed_prekey(id, record)
            .await
    }
    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.read().await.backend().load_signed_prekey(id).await
    }
    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        self.read().await.backend().load_all_signed_prekeys().await
    }
    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.read().await.backend().remove_signed_prekey(id).await
    }
    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.for_write("put_sender_key")
            .await?
            .backend()
            .put_sender_key(address, record)
            .await
    }
    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        self.for_write("put_sender_keys_batch")
            .await?
            .backend()
            .put_sender_keys_batch(sender_keys)
            .await
    }
    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.read().await.backend().get_sender_key(address).await
    }
    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.read().await.backend().delete_sender_key(address).await
    }
}

#[async_trait]
impl AppSyncStore for DeviceBackend {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        self.read().await.backend().get_sync_key(key_id).await
    }
    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        self.for_write("set_sync_key")
            .await?
            .backend()
            .set_sync_key(key_id, key)
            .await
    }
    async fn get_version(&self, name: &str) -> Result<HashState> {
        self.read().await.backend().get_version(name).await
    }
    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        self.for_write("set_version")
            .await?
            .backend()
            .set_version(name, state)
            .await
    }
    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        self.for_write("put_mutation_macs")
            .await?
            .backend()
            .put_mutation_macs(name, version, mutations)
            .await
    }
    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read()
            .await
            .backend()
            .get_mutation_mac(name, index_mac)
            .await
    }
    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<std::collections::HashMap<[u8; 32], Vec<u8>>> {
        self.read()
            .await
            .backend()
            .get_mutation_macs(name, index_macs)
            .await
    }
    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_mutation_macs(name, index_macs)
            .await
    }
    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.read().await.backend().clear_mutation_macs(name).await
    }
    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        self.read().await.backend().get_latest_sync_key_id().await
    }
}

#[async_trait]
impl ProtocolStore for DeviceBackend {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        self.read()
            .await
            .backend()
            .get_sender_key_devices(group_jid)
            .await
    }
    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        self.for_write("set_sender_key_status")
            .await?
            .backend()
            .set_sender_key_status(group_jid, entries)
            .await
    }
    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.read()
            .await
            .backend()
            .clear_sender_key_devices(group_jid)
            .await
    }
    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_sender_key_device_rows(device_jids)
            .await
    }
    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.read()
            .await
            .backend()
            .clear_all_sender_key_devices()
            .await
    }
    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        self.read().await.backend().get_lid_mapping(lid).await
    }
    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        self.read().await.backend().get_pn_mapping(phone).await
    }
    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.for_write("put_lid_mapping")
            .await?
            .backend()
            .put_lid_mapping(entry)
            .await
    }
    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        self.for_write("put_lid_mappings")
            .await?
            .backend()
            .put_lid_mappings(entries)
            .await
    }
    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        self.read().await.backend().get_all_lid_mappings().await
    }
    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.for_write("save_base_key")
            .await?
            .backend()
            .save_base_key(address, message_id, base_key)
            .await
    }
    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        self.read()
            .await
            .backend()
            .has_same_base_key(address, message_id, current_base_key)
            .await
    }
    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_base_key(address, message_id)
            .await
    }
    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.for_write("update_device_list")
            .await?
            .backend()
            .update_device_list(record)
            .await
    }
    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        self.for_write("update_device_lists")
            .await?
            .backend()
            .update_device_lists(records)
            .await
    }
    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        self.read().await.backend().get_devices(user).await
    }
    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.read().await.backend().delete_devices(user).await
    }
    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.read()
            .await
            .backend()
            .get_group_metadata(group_jid)
            .await
    }
    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.for_write("put_group_metadata")
            .await?
            .backend()
            .put_group_metadata(group_jid, blob)
            .await
    }
    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_group_metadata(group_jid)
            .await
    }
    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        self.read().await.backend().get_tc_token(jid).await
    }
    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.for_write("put_tc_token")
            .await?
            .backend()
            .put_tc_token(jid, entry)
            .await
    }
    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.read().await.backend().delete_tc_token(jid).await
    }
    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        self.read().await.backend().get_all_tc_token_jids().await
    }
    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        self.read()
            .await
            .backend()
            .delete_expired_tc_tokens(token_cutoff, sender_cutoff)
            .await
    }
    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        self.for_write("touch_tc_token_sender_timestamp")
            .await?
            .backend()
            .touch_tc_token_sender_timestamp(jid, sender_timestamp)
            .await
    }
    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        self.for_write("store_received_tc_token")
            .await?
            .backend()
            .store_received_tc_token(jid, token, token_timestamp)
            .await
    }
    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.for_write("store_sent_message")
            .await?
            .backend()
            .store_sent_message(chat_jid, message_id, payload)
            .await
    }
    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        self.read()
            .await
            .backend()
            .take_sent_message(chat_jid, message_id)
            .await
    }
    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.read()
            .await
            .backend()
            .delete_expired_sent_messages(cutoff_timestamp)
            .await
    }
    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.for_write("store_pending_inbound")
            .await?
            .backend()
            .store_pending_inbound(chat, sender, id, message)
            .await
    }
    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.read()
            .await
            .backend()
            .get_pending_inbound(chat, sender, id)
            .await
    }
    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_pending_inbound(chat, sender, id)
            .await
    }
    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.read()
            .await
            .backend()
            .delete_expired_pending_inbound(cutoff_timestamp)
            .await
    }
    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        self.for_write("store_pending_inbound_batch")
            .await?
            .backend()
            .store_pending_inbound_batch(rows)
            .await
    }
    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        self.read()
            .await
            .backend()
            .delete_pending_inbound_batch(keys)
            .await
    }
}

#[async_trait]
impl MsgSecretStore for DeviceBackend {
    async fn put_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
        secret: &[u8; wacore::reporting_token::MESSAGE_SECRET_SIZE],
    ) -> Result<()> {
        self.for_write("put_msg_secret")
            .await?
            .backend()
            .put_msg_secret(chat, sender, msg_id, secret)
            .await
    }
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        self.for_write("put_msg_secrets")
            .await?
            .backend()
            .put_msg_secrets(entries)
            .await
    }
    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.read()
            .await
            .backend()
            .get_msg_secret(chat, sender, msg_id)
            .await
    }
    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        self.read()
            .await
            .backend()
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await
    }
    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.read()
            .await
            .backend()
            .delete_expired_msg_secrets(cutoff_timestamp)
            .await
    }
}

#[async_trait]
impl DeviceStore for DeviceBackend {
    async fn save(&self, device: &wacore::store::Device) -> Result<()> {
        self.for_save(device).await?.backend().save(device).await
    }
    async fn load(&self) -> Result<Option<wacore::store::Device>> {
        self.read().await.backend().load().await
    }
    async fn exists(&self) -> Result<bool> {
        self.read().await.backend().exists().await
    }
    async fn create(&self) -> Result<i32> {
        self.read().await.backend().create().await
    }
    async fn snapshot_db(&self, name: &str, extra_content: Option<&[u8]>) -> Result<()> {
        self.read()
            .await
            .backend()
            .snapshot_db(name, extra_content)
            .await
    }
    async fn resource_report(&self) -> wacore::stats::StorageResourceReport {
        self.read().await.backend().resource_report().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wacore::store::Device;

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
        backend.close().await;

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
    async fn a_client_no_phone_has_claimed_refuses_lasting_writes_and_stays_in_memory() {
        let backend = DeviceBackend::pending();
        backend.save(&Device::new()).await.unwrap();

        let refused = backend.put_identity("6281234567890.0", [7; 32]).await;

        assert!(refused.is_err());
        assert!(!backend.is_on_disk().await);
    }
}
