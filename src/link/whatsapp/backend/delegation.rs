//! whatsapp-rust's store traits for [`DeviceBackend`]: each call goes to
//! the store of the current phase. Reads and deletions go as they are;
//! writes that must last go through [`DeviceBackend::for_write`], which
//! moves a pending device to disk first.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use wacore::appstate::hash::HashState;
use wacore::appstate::processor::AppStateMutationMAC;
use wacore::store::error::Result;
use wacore::store::traits::*;

use super::DeviceBackend;

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
