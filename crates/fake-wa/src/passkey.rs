//! The passkey gate ("SHORTCAKE_PASSKEY"): WhatsApp's side and the phone's
//! side of linking a companion to an account that has a passkey, mirrored
//! from the companion side in `wacore::shortcake` and whatsapp-rust's
//! `passkey::flow`.
//!
//! In protocol order, for one companion connection:
//! 1. The server asks for a passkey: a `passkey_prologue_request`
//!    notification carrying WebAuthn request options (a fresh challenge,
//!    `rpId` [`RP_ID`], the account's credential id).
//! 2. The companion fetches a `ref` and sends `passkey_prologue`: its
//!    credential id, the WebAuthn assertion, and a prologue (its ephemeral
//!    X25519 key, platform and that ref, plus a commitment to a nonce it
//!    does not reveal yet). [`verify_assertion`] checks the assertion as a
//!    WebAuthn relying party does: the credential is the account's, the
//!    client data is a `webauthn.get` of this challenge from [`ORIGIN`], the
//!    authenticator data is for [`RP_ID`] with the user present and
//!    verified, and the P-256 signature verifies under the registered key.
//! 3. The phone answers with its own ephemeral key and nonce
//!    (`crsc_continuation`); the companion reveals its nonce
//!    (`companion_nonce`), which must match the commitment. Both sides now
//!    derive the same 8-character verification code from the two nonces and
//!    the phone's key: the person compares them.
//! 4. The companion sends `encrypted_pairing_request`: its Noise and
//!    identity keys and a new ADV secret, sealed with AES-256-GCM under a key
//!    both sides derived from X25519 of the two ephemeral keys. The phone
//!    opens it and links the device through the ordinary `pair-success`.
//!
//! [`SoftwareAuthenticator`] plays the authenticator holding the account's
//! passkey (a password manager on the phone), so tests can make assertions.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use buffa::Message as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use rand::RngExt as _;
use sha2::{Digest as _, Sha256};
use wacore::libsignal::crypto::aes_256_gcm_decrypt;
use wacore::libsignal::protocol::{KeyPair, PublicKey};
use wacore::shortcake::ShortcakeUtils;
use waproto::whatsapp as wa;

use std::sync::Arc;
use std::time::Duration;

use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;

use crate::wire::public_bytes;
use crate::{
    Command, Completion, LinkedVia, Shared, attr, content_bytes, iq_error, iq_result, random_ref,
};

/// The relying party WhatsApp's passkeys are registered for: an assertion
/// is only valid for this domain.
pub const RP_ID: &str = "web.whatsapp.com";
/// The origin WhatsApp accepts in an assertion's client data.
pub const ORIGIN: &str = "https://web.whatsapp.com";
/// How long the person has for the passkey prompt, as the options say.
const PROMPT_TIMEOUT_MS: u64 = 60_000;
/// Authenticator-data flags: the user was present (UP) and verified (UV).
const FLAG_USER_PRESENT: u8 = 0x01;
const FLAG_USER_VERIFIED: u8 = 0x04;
/// RP id hash (32) + flags (1) + signature counter (4).
const AUTHENTICATOR_DATA_MIN_LEN: usize = 37;

/// How long the phone takes to answer a companion's step (its ephemeral
/// identity after the prologue, `pair-success` after the sealed request).
/// Also a margin: whatsapp-rust stores its handshake, and commits the new
/// ADV secret, only after WhatsApp's IQ result, so an answer sent in the
/// same instant could in principle overtake them (not seen in test runs
/// without the delay, but nothing in the library orders them).
const PHONE_ROUND_TRIP: Duration = Duration::from_millis(100);

/// A passkey registered to an account: what WhatsApp keeps of it.
#[derive(Debug, Clone)]
pub struct PasskeyCredential {
    /// The credential id the authenticator names it by.
    pub credential_id: Vec<u8>,
    /// Its P-256 public key.
    pub public_key: VerifyingKey,
}

/// One connection's passkey exchange, as far as it got.
pub(crate) struct Exchange {
    /// The account being linked.
    pub account: String,
    credential: PasskeyCredential,
    challenge: [u8; 32],
    /// The ref handed out for this exchange (`<ref>` IQ).
    pairing_ref: Option<String>,
    /// The companion's prologue, once its assertion verified.
    prologue: Option<Prologue>,
    /// The phone's ephemeral key and nonce, once it answered.
    primary: Option<(KeyPair, [u8; 32])>,
    /// Whether the companion revealed the nonce it committed to.
    nonce_revealed: bool,
}

/// What the companion's `prologue_payload` says.
struct Prologue {
    identity: Vec<u8>,
    companion_ephemeral: [u8; 32],
    device_type: wa::device_props::PlatformType,
    commitment: [u8; 32],
}

/// What the phone read from a companion's sealed pairing request.
pub(crate) struct PairingRequest {
    pub noise_key: [u8; 32],
    pub identity_key: [u8; 32],
    pub adv_secret: [u8; 32],
}

impl Exchange {
    /// A new exchange for `account`, with a fresh challenge.
    pub fn new(account: &str, credential: PasskeyCredential) -> Self {
        let mut challenge = [0u8; 32];
        rand::rng().fill(&mut challenge);
        Self {
            account: account.to_owned(),
            credential,
            challenge,
            pairing_ref: None,
            prologue: None,
            primary: None,
            nonce_revealed: false,
        }
    }

    /// The `PublicKeyCredentialRequestOptions` JSON of
    /// `passkey_prologue_request`.
    pub fn request_options(&self) -> String {
        serde_json::json!({
            "challenge": URL_SAFE_NO_PAD.encode(self.challenge),
            "rpId": RP_ID,
            "allowCredentials": [{
                "type": "public-key",
                "id": URL_SAFE_NO_PAD.encode(&self.credential.credential_id),
            }],
            "userVerification": "required",
            "timeout": PROMPT_TIMEOUT_MS,
        })
        .to_string()
    }

    /// Hands out the ref the companion's prologue must name; not once a
    /// prologue was accepted (the keys both sides derive name that ref).
    pub fn issue_ref(&mut self, pairing_ref: String) -> Result<(), String> {
        if self.prologue.is_some() {
            return Err("a ref after an accepted prologue".into());
        }
        self.pairing_ref = Some(pairing_ref);
        Ok(())
    }

    /// Checks a `passkey_prologue`; on success returns the
    /// `PrimaryEphemeralIdentity` the phone answers with.
    pub fn accept_prologue(
        &mut self,
        credential_id: &[u8],
        assertion_json: &[u8],
        prologue_payload: &[u8],
    ) -> Result<Vec<u8>, String> {
        if self.prologue.is_some() {
            return Err("a prologue was already accepted on this exchange".into());
        }
        let pairing_ref = self
            .pairing_ref
            .as_deref()
            .ok_or("no ref was fetched before the prologue")?;
        verify_assertion(
            &self.credential,
            &self.challenge,
            credential_id,
            assertion_json,
        )?;
        let prologue = parse_prologue(prologue_payload, pairing_ref)?;
        let keys = KeyPair::generate(&mut rand::rng());
        let mut nonce = [0u8; 32];
        rand::rng().fill(&mut nonce);
        let answer = wa::PrimaryEphemeralIdentity {
            public_key: Some(public_bytes(&keys).to_vec()),
            nonce: Some(nonce.to_vec()),
        }
        .encode_to_vec();
        self.prologue = Some(prologue);
        self.primary = Some((keys, nonce));
        Ok(answer)
    }

    /// Checks the revealed `companion_nonce` against the commitment and
    /// returns the verification code the phone shows (`ABCDEFGH`).
    pub fn reveal_nonce(&mut self, nonce: &[u8]) -> Result<String, String> {
        let (Some(prologue), Some((keys, primary_nonce))) = (&self.prologue, &self.primary) else {
            return Err("companion_nonce before an accepted prologue".into());
        };
        let nonce: [u8; 32] = nonce
            .try_into()
            .map_err(|_| "companion_nonce is not 32 bytes".to_owned())?;
        if ShortcakeUtils::commitment_hash(&prologue.identity, &nonce) != prologue.commitment {
            return Err("companion_nonce does not match the prologue's commitment".into());
        }
        self.nonce_revealed = true;
        Ok(ShortcakeUtils::derive_verification_code(
            &nonce,
            &public_bytes(keys),
            primary_nonce,
        ))
    }

    /// Opens `encrypted_pairing_request` with the key both sides derived.
    pub fn open_pairing_request(&self, sealed: &[u8]) -> Result<PairingRequest, String> {
        let (Some(prologue), Some((keys, _))) = (&self.prologue, &self.primary) else {
            return Err("encrypted_pairing_request before an accepted prologue".into());
        };
        if !self.nonce_revealed {
            return Err("encrypted_pairing_request before companion_nonce".into());
        }
        let companion = PublicKey::from_djb_public_key_bytes(&prologue.companion_ephemeral)
            .map_err(|e| format!("companion ephemeral key: {e}"))?;
        let shared = keys
            .private_key
            .calculate_agreement(&companion)
            .map_err(|e| format!("key agreement: {e}"))?;
        let key = ShortcakeUtils::derive_encryption_key_from_shared_secret(
            &shared,
            prologue.device_type,
            self.pairing_ref.as_deref().unwrap_or_default(),
        )
        .map_err(|e| e.to_string())?;
        let sealed = wa::EncryptedPairingRequest::decode_from_slice(sealed)
            .map_err(|_| "encrypted_pairing_request is not an EncryptedPairingRequest")?;
        let iv: [u8; 12] = sealed
            .iv
            .as_deref()
            .and_then(|iv| iv.try_into().ok())
            .ok_or("encrypted_pairing_request without a 12-byte iv")?;
        let mut plain = Vec::new();
        aes_256_gcm_decrypt(
            &key,
            &iv,
            b"",
            sealed.encrypted_payload.as_deref().unwrap_or_default(),
            &mut plain,
        )
        .map_err(|_| "encrypted_pairing_request does not open with the derived key")?;
        let request = wa::PairingRequest::decode_from_slice(&plain)
            .map_err(|_| "the sealed payload is not a PairingRequest")?;
        let key32 = |field: Option<Vec<u8>>, what: &str| {
            field
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or(format!("PairingRequest without a 32-byte {what}"))
        };
        Ok(PairingRequest {
            noise_key: key32(request.companion_public_key, "companion_public_key")?,
            identity_key: key32(request.companion_identity_key, "companion_identity_key")?,
            adv_secret: key32(request.adv_secret, "adv_secret")?,
        })
    }
}

/// Checks a WebAuthn assertion (WhatsApp Web's `<webauthn_assertion>` JSON)
/// as the relying party does; `Err` says what failed.
pub fn verify_assertion(
    credential: &PasskeyCredential,
    challenge: &[u8],
    credential_id: &[u8],
    assertion_json: &[u8],
) -> Result<(), String> {
    if credential_id != credential.credential_id {
        return Err("the credential is not this account's passkey".into());
    }
    let assertion: serde_json::Value =
        serde_json::from_slice(assertion_json).map_err(|_| "the assertion is not JSON")?;
    let field = |path: &[&str]| -> Result<Vec<u8>, String> {
        let mut value = &assertion;
        for key in path {
            value = &value[*key];
        }
        let text = value
            .as_str()
            .ok_or_else(|| format!("the assertion has no {}", path.join(".")))?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| format!("{} is not base64url", path.join(".")))
    };
    if field(&["rawId"])? != credential.credential_id {
        return Err("the assertion's rawId is not the credential sent".into());
    }
    if assertion["type"] != "public-key" {
        return Err("the assertion's type is not public-key".into());
    }
    let client_data_json = field(&["response", "clientDataJSON"])?;
    let authenticator_data = field(&["response", "authenticatorData"])?;
    let signature = field(&["response", "signature"])?;

    let client_data: serde_json::Value =
        serde_json::from_slice(&client_data_json).map_err(|_| "clientDataJSON is not JSON")?;
    if client_data["type"] != "webauthn.get" {
        return Err("the client data is not a webauthn.get".into());
    }
    if client_data["challenge"] != URL_SAFE_NO_PAD.encode(challenge) {
        return Err("the assertion signs another challenge".into());
    }
    if client_data["origin"] != ORIGIN {
        return Err(format!(
            "the assertion was made on another origin than {ORIGIN}"
        ));
    }
    if authenticator_data.len() < AUTHENTICATOR_DATA_MIN_LEN {
        return Err("authenticatorData is too short".into());
    }
    if authenticator_data[..32] != Sha256::digest(RP_ID.as_bytes())[..] {
        return Err(format!(
            "the assertion is for another relying party than {RP_ID}"
        ));
    }
    let flags = authenticator_data[32];
    if flags & FLAG_USER_PRESENT == 0 || flags & FLAG_USER_VERIFIED == 0 {
        return Err("the authenticator did not verify the user".into());
    }
    let signature = Signature::from_der(&signature).map_err(|_| "the signature is not DER")?;
    let mut signed = authenticator_data;
    signed.extend_from_slice(&Sha256::digest(&client_data_json));
    credential
        .public_key
        .verify(&signed, &signature)
        .map_err(|_| "the signature does not verify under the account's passkey".into())
}

/// Decodes a `prologue_payload` and checks it names `pairing_ref`.
fn parse_prologue(payload: &[u8], pairing_ref: &str) -> Result<Prologue, String> {
    let payload = wa::ProloguePayload::decode_from_slice(payload)
        .map_err(|_| "prologue_payload is not a ProloguePayload")?;
    let identity = payload
        .companion_ephemeral_identity
        .ok_or("prologue without a companion ephemeral identity")?;
    let commitment: [u8; 32] = payload
        .commitment
        .as_option()
        .and_then(|c| c.hash.as_deref())
        .and_then(|h| h.try_into().ok())
        .ok_or("prologue without a 32-byte commitment")?;
    let parsed = wa::CompanionEphemeralIdentity::decode_from_slice(&identity)
        .map_err(|_| "not a CompanionEphemeralIdentity")?;
    if parsed.r#ref.as_deref() != Some(pairing_ref) {
        return Err("the prologue names another ref than the one handed out".into());
    }
    let companion_ephemeral: [u8; 32] = parsed
        .public_key
        .as_deref()
        .and_then(|k| k.try_into().ok())
        .ok_or("the companion's ephemeral key is not 32 raw bytes")?;
    Ok(Prologue {
        identity,
        companion_ephemeral,
        device_type: parsed
            .device_type
            .unwrap_or(wa::device_props::PlatformType::UNKNOWN),
        commitment,
    })
}

/// Asks the companion on `connection` for `phone`'s passkey, if the
/// account has one: a `passkey_prologue_request` to send after the answer
/// to its `companion_hello`.
pub(crate) fn ask(shared: &Shared, connection: u64, phone: &str) -> Option<Command> {
    let options = {
        let mut state = shared.lock();
        let credential = state.phones.get(phone)?.passkey.clone()?;
        let exchange = Exchange::new(phone, credential);
        let options = exchange.request_options();
        state.connections.get_mut(&connection)?.passkey = Some(exchange);
        options
    };
    shared.update(phone, |p| p.record.passkey_requests += 1);
    Some(Command::Send(
        shared.notification(
            "passkey_prologue_request",
            NodeBuilder::new("passkey_request_options")
                .bytes(options.into_bytes())
                .build(),
        ),
    ))
}

/// Answers the passkey exchange's IQs (`md` namespace: `ref`,
/// `passkey_request_options`, `passkey_prologue`, `companion_nonce`,
/// `encrypted_pairing_request`); `None` for any other IQ.
pub(crate) fn answer_iq(
    shared: &Arc<Shared>,
    connection: u64,
    id: &str,
    node: &Node,
) -> Option<Vec<Command>> {
    if attr(node, "xmlns").as_deref() != Some("md") {
        return None;
    }
    let child = |tag: &str| node.get_optional_child_by_tag(&[tag]);
    let step = if child("ref").is_some() {
        Step::Ref
    } else if child("passkey_request_options").is_some() {
        Step::Options
    } else if let Some(prologue) = child("passkey_prologue") {
        let part = |tag: &str| {
            prologue
                .get_optional_child_by_tag(&[tag])
                .and_then(content_bytes)
                .unwrap_or_default()
        };
        Step::Prologue {
            credential_id: part("credential_id"),
            assertion: part("webauthn_assertion"),
            payload: part("prologue_payload"),
        }
    } else if let Some(nonce) = child("companion_nonce") {
        Step::Nonce(content_bytes(nonce).unwrap_or_default())
    } else if let Some(sealed) = child("encrypted_pairing_request") {
        Step::Sealed(content_bytes(sealed).unwrap_or_default())
    } else {
        return None;
    };
    Some(exchange_step(shared, connection, id, step))
}

/// One companion request of the exchange.
enum Step {
    Ref,
    Options,
    Prologue {
        credential_id: Vec<u8>,
        assertion: Vec<u8>,
        payload: Vec<u8>,
    },
    Nonce(Vec<u8>),
    Sealed(Vec<u8>),
}

fn exchange_step(shared: &Arc<Shared>, connection: u64, id: &str, step: Step) -> Vec<Command> {
    let mut state = shared.lock();
    let Some(conn) = state.connections.get_mut(&connection) else {
        return Vec::new();
    };
    let noise_key = conn.noise_key;
    let sender = conn.commands.clone();
    let Some(exchange) = conn.passkey.as_mut() else {
        // WhatsApp asked this connection for no passkey.
        return vec![Command::Send(iq_error(id, 400, "bad-request", None))];
    };
    let account = exchange.account.clone();
    let done = vec![Command::Send(iq_result(id, None))];
    // Recorded once the lock is released.
    let mut assertion_verified = false;
    let mut code_shown = None;
    let outcome = match step {
        Step::Ref => {
            let pairing_ref = random_ref();
            exchange.issue_ref(pairing_ref.clone()).map(|()| {
                let answer = NodeBuilder::new("ref").bytes(pairing_ref.into_bytes());
                vec![Command::Send(iq_result(id, Some(answer.build())))]
            })
        }
        Step::Options => {
            let answer = NodeBuilder::new("passkey_request_options")
                .bytes(exchange.request_options().into_bytes());
            Ok(vec![Command::Send(iq_result(id, Some(answer.build())))])
        }
        Step::Prologue {
            credential_id,
            assertion,
            payload,
        } => match exchange.accept_prologue(&credential_id, &assertion, &payload) {
            Ok(primary) => {
                let continuation = shared.notification(
                    "crsc_continuation",
                    NodeBuilder::new("primary_ephemeral_identity")
                        .bytes(primary)
                        .build(),
                );
                // The phone answers once the companion holds its handshake.
                tokio::spawn(async move {
                    tokio::time::sleep(PHONE_ROUND_TRIP).await;
                    let _ = sender.send(Command::Send(continuation));
                });
                assertion_verified = true;
                Ok(done)
            }
            Err(refusal) => Err(refusal),
        },
        Step::Nonce(nonce) => exchange.reveal_nonce(&nonce).map(|code| {
            code_shown = Some(code);
            done
        }),
        Step::Sealed(sealed) => match exchange.open_pairing_request(&sealed) {
            Ok(request) if request.noise_key == noise_key => {
                conn.passkey = None;
                match state.phones.get(&account).map(|p| p.identity.clone()) {
                    Some(identity) => {
                        let shared = Arc::clone(shared);
                        let account = account.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(PHONE_ROUND_TRIP).await;
                            let linked = shared
                                .complete_link(Completion {
                                    account: &account,
                                    connection: &sender,
                                    identity: &identity,
                                    companion_identity: request.identity_key,
                                    adv_secret: request.adv_secret,
                                    noise_key: request.noise_key,
                                    via: LinkedVia::Passkey,
                                    code: None,
                                })
                                .await;
                            if let Err(error) = linked {
                                tracing::warn!(%error, "the passkey link did not complete");
                            }
                        });
                        Ok(done)
                    }
                    None => Err("the account is gone".to_owned()),
                }
            }
            Ok(_) => Err("the sealed request names another Noise key than its connection's".into()),
            Err(refusal) => Err(refusal),
        },
    };
    drop(state);
    match outcome {
        Ok(answer) => {
            if assertion_verified || code_shown.is_some() {
                shared.update(&account, |p| {
                    p.record.passkey_assertions += u32::from(assertion_verified);
                    if code_shown.is_some() {
                        p.record.verification_code = code_shown;
                    }
                });
            }
            answer
        }
        Err(refusal) => {
            tracing::info!(%refusal, "passkey exchange refused");
            shared.update(&account, |p| p.record.passkey_refusals += 1);
            vec![Command::Send(iq_error(id, 401, "not-authorized", None))]
        }
    }
}

/// An authenticator holding one passkey in software: it signs what a
/// password manager would after the person unlocked it.
pub struct SoftwareAuthenticator {
    key: SigningKey,
    credential_id: Vec<u8>,
}

impl SoftwareAuthenticator {
    /// A new passkey with a random key and credential id.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        let mut credential_id = vec![0u8; 16];
        let mut rng = rand::rng();
        // Out of 2^256 seeds, the few outside the curve order are retried.
        let key = loop {
            rng.fill(&mut seed);
            if let Ok(key) = SigningKey::from_bytes(&seed.into()) {
                break key;
            }
        };
        rng.fill(&mut credential_id[..]);
        Self { key, credential_id }
    }

    /// What WhatsApp registers for the account.
    pub fn credential(&self) -> PasskeyCredential {
        PasskeyCredential {
            credential_id: self.credential_id.clone(),
            public_key: *self.key.verifying_key(),
        }
    }

    /// Answers `request_options_json` as a browser's
    /// `navigator.credentials.get()` on `origin` would, in the JSON form
    /// WebAuthn calls `AuthenticationResponseJSON`.
    pub fn assert(&self, request_options_json: &str, origin: &str) -> serde_json::Value {
        let options: serde_json::Value =
            serde_json::from_str(request_options_json).unwrap_or_default();
        let challenge = options["challenge"].as_str().unwrap_or_default();
        let rp_id = options["rpId"].as_str().unwrap_or(RP_ID);
        let client_data_json = serde_json::json!({
            "type": "webauthn.get",
            "challenge": challenge,
            "origin": origin,
            "crossOrigin": false,
        })
        .to_string()
        .into_bytes();
        let mut authenticator_data = Sha256::digest(rp_id.as_bytes()).to_vec();
        authenticator_data.push(FLAG_USER_PRESENT | FLAG_USER_VERIFIED);
        authenticator_data.extend_from_slice(&1u32.to_be_bytes());
        let mut signed = authenticator_data.clone();
        signed.extend_from_slice(&Sha256::digest(&client_data_json));
        let signature: DerSignature = self.key.sign(&signed);
        let id = URL_SAFE_NO_PAD.encode(&self.credential_id);
        serde_json::json!({
            "id": id,
            "rawId": id,
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": URL_SAFE_NO_PAD.encode(&client_data_json),
                "authenticatorData": URL_SAFE_NO_PAD.encode(&authenticator_data),
                "signature": URL_SAFE_NO_PAD.encode(signature.as_bytes()),
                "userHandle": null,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WA-shaped `<webauthn_assertion>` the companion sends: the same
    /// fields as a browser's answer.
    fn wire_assertion(answer: &serde_json::Value) -> Vec<u8> {
        answer.to_string().into_bytes()
    }

    fn exchange(authenticator: &SoftwareAuthenticator) -> Exchange {
        let mut exchange = Exchange::new("15551230000", authenticator.credential());
        exchange.issue_ref("REF-1".into()).unwrap();
        exchange
    }

    fn verify(exchange: &Exchange, answer: &serde_json::Value) -> Result<(), String> {
        verify_assertion(
            &exchange.credential,
            &exchange.challenge,
            &exchange.credential.credential_id,
            &wire_assertion(answer),
        )
    }

    #[test]
    fn an_assertion_made_with_the_accounts_passkey_verifies() {
        let authenticator = SoftwareAuthenticator::generate();
        let exchange = exchange(&authenticator);

        let answer = authenticator.assert(&exchange.request_options(), ORIGIN);

        assert_eq!(verify(&exchange, &answer), Ok(()));
    }

    #[test]
    fn an_assertion_from_another_passkey_is_refused() {
        let account = SoftwareAuthenticator::generate();
        let stranger = SoftwareAuthenticator::generate();
        let exchange = exchange(&account);
        let mut answer = stranger.assert(&exchange.request_options(), ORIGIN);
        // Claims the account's credential, signed with another key.
        let id = URL_SAFE_NO_PAD.encode(&account.credential_id);
        answer["rawId"] = id.clone().into();
        answer["id"] = id.into();

        let refused = verify(&exchange, &answer).unwrap_err();

        assert!(refused.contains("does not verify"), "{refused}");
    }

    #[test]
    fn an_assertion_made_on_another_origin_is_refused() {
        let authenticator = SoftwareAuthenticator::generate();
        let exchange = exchange(&authenticator);

        let answer = authenticator.assert(&exchange.request_options(), "https://pair.example.com");

        assert!(verify(&exchange, &answer).unwrap_err().contains("origin"));
    }

    #[test]
    fn an_assertion_of_an_old_challenge_is_refused() {
        let authenticator = SoftwareAuthenticator::generate();
        let earlier = exchange(&authenticator);
        let exchange = exchange(&authenticator);

        let answer = authenticator.assert(&earlier.request_options(), ORIGIN);

        assert!(
            verify(&exchange, &answer)
                .unwrap_err()
                .contains("challenge")
        );
    }

    #[test]
    fn an_assertion_for_another_relying_party_is_refused() {
        let authenticator = SoftwareAuthenticator::generate();
        let exchange = exchange(&authenticator);
        let options: serde_json::Value = serde_json::from_str(&exchange.request_options()).unwrap();
        let mut elsewhere = options.clone();
        elsewhere["rpId"] = "pair.example.com".into();

        let answer = authenticator.assert(&elsewhere.to_string(), ORIGIN);

        assert!(
            verify(&exchange, &answer)
                .unwrap_err()
                .contains("relying party")
        );
    }

    #[test]
    fn a_nonce_that_does_not_match_the_commitment_is_refused() {
        let authenticator = SoftwareAuthenticator::generate();
        let mut exchange = exchange(&authenticator);
        let keys = KeyPair::generate(&mut rand::rng());
        let identity = ShortcakeUtils::build_companion_ephemeral_identity(
            &public_bytes(&keys),
            wa::device_props::PlatformType::CHROME,
            "REF-1",
        );
        let nonce = [7u8; 32];
        let prologue = ShortcakeUtils::build_prologue_payload(
            &identity,
            &ShortcakeUtils::commitment_hash(&identity, &nonce),
        );
        let answer = authenticator.assert(&exchange.request_options(), ORIGIN);
        exchange
            .accept_prologue(
                &authenticator.credential_id,
                &wire_assertion(&answer),
                &prologue,
            )
            .unwrap();

        let refused = exchange.reveal_nonce(&[8u8; 32]).unwrap_err();
        let code = exchange.reveal_nonce(&nonce).unwrap();

        assert!(refused.contains("commitment"), "{refused}");
        assert_eq!(code.len(), 8);
    }

    #[test]
    fn a_prologue_naming_another_ref_is_refused() {
        let authenticator = SoftwareAuthenticator::generate();
        let mut exchange = exchange(&authenticator);
        let keys = KeyPair::generate(&mut rand::rng());
        let identity = ShortcakeUtils::build_companion_ephemeral_identity(
            &public_bytes(&keys),
            wa::device_props::PlatformType::CHROME,
            "SOME-OTHER-REF",
        );
        let prologue = ShortcakeUtils::build_prologue_payload(&identity, &[0u8; 32]);
        let answer = authenticator.assert(&exchange.request_options(), ORIGIN);

        let refused = exchange
            .accept_prologue(
                &authenticator.credential_id,
                &wire_assertion(&answer),
                &prologue,
            )
            .unwrap_err();

        assert!(refused.contains("ref"), "{refused}");
    }
}
