//! The phone's side of "Link with phone number": what the primary device does
//! after a person types the 8-character code. All of it is public protocol,
//! mirrored from the companion side in `wacore::pair_code` and `wacore::pair`.
//!
//! 1. `primary_hello`: unwrap the companion's ephemeral key with the typed
//!    code, wrap our own ephemeral key with the same code.
//! 2. `companion_finish`: open the companion's key bundle. It only opens when
//!    both sides used the same code, which is how a mistyped code fails.
//! 3. `pair-success`: sign the new device identity with the account key and
//!    MAC it with the ADV secret both sides derived.

use buffa::Message as _;
use rand::RngExt as _;
use wacore::libsignal::crypto::{aes_256_gcm_decrypt, hmac_sha256};
use wacore::libsignal::protocol::{KeyPair, PublicKey};
use wacore::pair_code::PairCodeUtils;
use waproto::whatsapp as wa;

use crate::wire::public_bytes;

/// HKDF info for the key-bundle encryption key (wacore `prepare_key_bundle`).
const BUNDLE_KEY_INFO: &[u8] = b"link_code_pairing_key_bundle_encryption_key";
/// HKDF info for the ADV secret (wacore `prepare_key_bundle`).
const ADV_SECRET_INFO: &[u8] = b"adv_secret";
/// Prefix of the account signature over a device identity (wacore `pair`).
const ACCOUNT_SIGNATURE_PREFIX: &[u8] = &[6, 0];
/// Prefix of the companion's device signature (wacore `pair`).
const DEVICE_SIGNATURE_PREFIX: &[u8] = &[6, 1];
/// Sizes of the wrapped key bundle: salt, GCM nonce, then ciphertext+tag.
const BUNDLE_SALT_LEN: usize = 32;
const BUNDLE_IV_LEN: usize = 12;

/// Why stage two did not produce a link.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StageTwoError {
    /// The bundle did not open: the code typed on the phone is not the code
    /// the companion displayed.
    #[error("the key bundle does not open with the typed code")]
    WrongCode,
    /// The bundle opened but its content is not what the protocol says.
    #[error("malformed key bundle: {0}")]
    Malformed(String),
}

/// The primary's state between `primary_hello` and `companion_finish`.
pub struct PrimaryHello {
    /// Ephemeral key pair for this attempt.
    ephemeral: KeyPair,
    /// The companion's ephemeral public key as unwrapped with the typed code
    /// (garbage when the code is wrong; nothing can tell yet).
    companion_ephemeral: [u8; 32],
    /// Our ephemeral public key wrapped with the typed code, 80 bytes.
    pub wrapped_primary_ephemeral: [u8; 80],
}

impl PrimaryHello {
    /// Does the PBKDF2-heavy part of typing a code (two derivations): call it
    /// from a blocking thread.
    pub fn new(
        typed_code: &str,
        wrapped_companion_ephemeral: &[u8],
    ) -> Result<Self, StageTwoError> {
        let companion_ephemeral =
            PairCodeUtils::decrypt_primary_ephemeral_pub(wrapped_companion_ephemeral, typed_code)
                .map_err(|e| StageTwoError::Malformed(e.to_string()))?;
        let ephemeral = KeyPair::generate(&mut rand::rng());
        let wrapped_primary_ephemeral =
            PairCodeUtils::encrypt_ephemeral_pub(&public_bytes(&ephemeral), typed_code);
        Ok(Self {
            ephemeral,
            companion_ephemeral,
            wrapped_primary_ephemeral,
        })
    }

    /// Opens the companion's key bundle and derives the ADV secret.
    pub fn open_bundle(
        &self,
        primary_identity: &KeyPair,
        wrapped_bundle: &[u8],
        companion_identity: &[u8; 32],
    ) -> Result<[u8; 32], StageTwoError> {
        if wrapped_bundle.len() <= BUNDLE_SALT_LEN + BUNDLE_IV_LEN {
            return Err(StageTwoError::Malformed("bundle too short".into()));
        }
        let companion_eph = PublicKey::from_djb_public_key_bytes(&self.companion_ephemeral)
            .map_err(|_| StageTwoError::WrongCode)?;
        let ephemeral_shared = self
            .ephemeral
            .private_key
            .calculate_agreement(&companion_eph)
            .map_err(|_| StageTwoError::WrongCode)?;

        let (salt, rest) = wrapped_bundle.split_at(BUNDLE_SALT_LEN);
        let (iv, sealed) = rest.split_at(BUNDLE_IV_LEN);
        let mut key = [0u8; 32];
        wacore::crypto::hkdf_sha256_into(&ephemeral_shared, Some(salt), BUNDLE_KEY_INFO, &mut key)
            .map_err(|e| StageTwoError::Malformed(e.to_string()))?;
        let iv: [u8; BUNDLE_IV_LEN] = iv
            .try_into()
            .map_err(|_| StageTwoError::Malformed("bad iv".into()))?;
        let mut bundle = Vec::new();
        aes_256_gcm_decrypt(&key, &iv, b"", sealed, &mut bundle)
            .map_err(|_| StageTwoError::WrongCode)?;

        // companion identity (32) || primary identity (32) || random (32)
        if bundle.len() != 96 {
            return Err(StageTwoError::Malformed(format!(
                "bundle is {} bytes, expected 96",
                bundle.len()
            )));
        }
        if &bundle[..32] != companion_identity {
            return Err(StageTwoError::Malformed(
                "bundle names another companion identity".into(),
            ));
        }
        if bundle[32..64] != public_bytes(primary_identity) {
            return Err(StageTwoError::Malformed(
                "bundle names another primary identity".into(),
            ));
        }
        let companion_id = PublicKey::from_djb_public_key_bytes(companion_identity)
            .map_err(|e| StageTwoError::Malformed(e.to_string()))?;
        let identity_shared = primary_identity
            .private_key
            .calculate_agreement(&companion_id)
            .map_err(|e| StageTwoError::Malformed(e.to_string()))?;

        let mut secret_input = Vec::with_capacity(96);
        secret_input.extend_from_slice(&ephemeral_shared);
        secret_input.extend_from_slice(&identity_shared);
        secret_input.extend_from_slice(&bundle[64..96]);
        let mut adv_secret = [0u8; 32];
        wacore::crypto::hkdf_sha256_into(&secret_input, None, ADV_SECRET_INFO, &mut adv_secret)
            .map_err(|e| StageTwoError::Malformed(e.to_string()))?;
        Ok(adv_secret)
    }
}

/// Builds the `<device-identity>` payload of `pair-success`: an
/// `ADVSignedDeviceIdentityHMAC` whose account signature and HMAC verify on
/// the companion.
pub fn signed_device_identity(
    primary_identity: &KeyPair,
    companion_identity: &[u8; 32],
    adv_secret: &[u8; 32],
    key_index: u32,
) -> Vec<u8> {
    let mut rng = rand::rng();
    let details = wa::ADVDeviceIdentity {
        raw_id: Some(rng.random()),
        timestamp: Some(now_secs()),
        key_index: Some(key_index),
        ..Default::default()
    }
    .encode_to_vec();

    let mut to_sign = Vec::with_capacity(2 + details.len() + 32);
    to_sign.extend_from_slice(ACCOUNT_SIGNATURE_PREFIX);
    to_sign.extend_from_slice(&details);
    to_sign.extend_from_slice(companion_identity);
    let account_signature = primary_identity
        .private_key
        .calculate_signature(&to_sign, &mut rng)
        .map(|s| s.to_vec())
        .unwrap_or_default();

    let signed = wa::ADVSignedDeviceIdentity {
        details: Some(details),
        account_signature_key: Some(public_bytes(primary_identity).to_vec()),
        account_signature: Some(account_signature),
        ..Default::default()
    }
    .encode_to_vec();
    let hmac = hmac_sha256(adv_secret, &signed);
    wa::ADVSignedDeviceIdentityHMAC {
        details: Some(signed),
        hmac: Some(hmac.to_vec()),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Checks the companion's `pair-device-sign` answer: its device signature
/// must verify under the companion identity key that stage two named, over
/// the phone's own identity key (`account_key`), as WhatsApp checks it. The
/// `account_signature_key` a companion may echo in its answer is not used:
/// whatsapp-rust sends it, Baileys and whatsmeow strip it, and both forms
/// must link.
pub fn verify_device_signature(
    signed_identity: &[u8],
    companion_identity: &[u8; 32],
    account_key: &[u8; 32],
) -> Result<(), String> {
    let identity = wa::ADVSignedDeviceIdentity::decode_from_slice(signed_identity)
        .map_err(|e| e.to_string())?;
    let details = identity.details.unwrap_or_default();
    let signature = identity
        .device_signature
        .ok_or_else(|| "no device signature".to_string())?;
    let mut message = Vec::new();
    message.extend_from_slice(DEVICE_SIGNATURE_PREFIX);
    message.extend_from_slice(&details);
    message.extend_from_slice(companion_identity);
    message.extend_from_slice(account_key);
    let key =
        PublicKey::from_djb_public_key_bytes(companion_identity).map_err(|e| e.to_string())?;
    if key.verify_signature(&message, &signature) {
        Ok(())
    } else {
        Err("device signature does not verify".into())
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! The phone's side checked against the companion's side as the client
    //! library implements it (`wacore`), not against itself.

    use super::*;
    use wacore::pair::{DeviceState, PairUtils};

    const CODE: &str = "ABCD1234";

    struct Companion {
        ephemeral: KeyPair,
        identity: KeyPair,
        noise: KeyPair,
    }

    fn companion() -> Companion {
        let mut rng = rand::rng();
        Companion {
            ephemeral: KeyPair::generate(&mut rng),
            identity: KeyPair::generate(&mut rng),
            noise: KeyPair::generate(&mut rng),
        }
    }

    /// Stage two as the companion runs it; returns its bundle and secret.
    fn companion_finish(
        c: &Companion,
        hello: &PrimaryHello,
        primary: &KeyPair,
    ) -> (Vec<u8>, [u8; 32]) {
        let primary_ephemeral =
            PairCodeUtils::decrypt_primary_ephemeral_pub(&hello.wrapped_primary_ephemeral, CODE)
                .unwrap();
        PairCodeUtils::prepare_key_bundle(
            &c.ephemeral,
            &primary_ephemeral,
            &public_bytes(primary),
            &c.identity,
        )
        .unwrap()
    }

    #[test]
    fn the_right_code_opens_the_bundle_and_both_sides_derive_one_adv_secret() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());
        let wrapped = PairCodeUtils::encrypt_ephemeral_pub(&public_bytes(&c.ephemeral), CODE);

        let hello = PrimaryHello::new(CODE, &wrapped).unwrap();
        let (bundle, companion_secret) = companion_finish(&c, &hello, &primary);
        let opened = hello.open_bundle(&primary, &bundle, &public_bytes(&c.identity));

        assert_eq!(opened, Ok(companion_secret));
    }

    #[test]
    fn a_mistyped_code_does_not_open_the_bundle() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());
        let wrapped = PairCodeUtils::encrypt_ephemeral_pub(&public_bytes(&c.ephemeral), CODE);

        let hello = PrimaryHello::new("ABCD1235", &wrapped).unwrap();
        // The companion still uses the code it displays.
        let (bundle, _) = companion_finish(&c, &hello, &primary);

        assert_eq!(
            hello.open_bundle(&primary, &bundle, &public_bytes(&c.identity)),
            Err(StageTwoError::WrongCode)
        );
    }

    #[test]
    fn the_signed_device_identity_passes_the_companions_own_verification() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());
        let adv_secret = [7u8; 32];

        let identity = signed_device_identity(&primary, &public_bytes(&c.identity), &adv_secret, 1);
        let state = DeviceState {
            identity_key: c.identity.clone(),
            noise_key: c.noise.clone(),
            adv_secret_key: adv_secret,
        };
        let (self_signed, key_index) =
            PairUtils::do_pair_crypto(&state, &identity).expect("HMAC and signature verify");

        assert_eq!(key_index, 1);
        assert_eq!(
            verify_device_signature(
                &self_signed,
                &public_bytes(&c.identity),
                &public_bytes(&primary)
            ),
            Ok(())
        );
    }

    /// A companion's `pair-device-sign` answer for `primary`, and the same
    /// answer with `account_signature_key` stripped (as Baileys and
    /// whatsmeow send it).
    fn signed_both_ways(c: &Companion, primary: &KeyPair) -> (Vec<u8>, Vec<u8>) {
        let adv_secret = [7u8; 32];
        let identity = signed_device_identity(primary, &public_bytes(&c.identity), &adv_secret, 1);
        let state = DeviceState {
            identity_key: c.identity.clone(),
            noise_key: c.noise.clone(),
            adv_secret_key: adv_secret,
        };
        let (with_key, _) = PairUtils::do_pair_crypto(&state, &identity).expect("verifies");
        let mut stripped = wa::ADVSignedDeviceIdentity::decode_from_slice(&with_key).unwrap();
        assert!(
            stripped.account_signature_key.is_some(),
            "whatsapp-rust echoes it"
        );
        stripped.account_signature_key = None;
        (with_key, stripped.encode_to_vec())
    }

    #[test]
    fn a_device_signature_verifies_under_the_phones_key_with_or_without_the_echoed_key() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());
        let (with_key, without_key) = signed_both_ways(&c, &primary);

        for answer in [with_key, without_key] {
            assert_eq!(
                verify_device_signature(
                    &answer,
                    &public_bytes(&c.identity),
                    &public_bytes(&primary)
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn a_device_signature_over_another_accounts_key_is_refused() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());
        let stranger = KeyPair::generate(&mut rand::rng());
        let (with_key, _) = signed_both_ways(&c, &primary);

        assert!(
            verify_device_signature(
                &with_key,
                &public_bytes(&c.identity),
                &public_bytes(&stranger)
            )
            .is_err(),
            "the echoed key must not be trusted over the phone's own"
        );
    }

    #[test]
    fn a_device_identity_under_another_adv_secret_is_refused() {
        let c = companion();
        let primary = KeyPair::generate(&mut rand::rng());

        let identity = signed_device_identity(&primary, &public_bytes(&c.identity), &[7u8; 32], 1);
        let state = DeviceState {
            identity_key: c.identity.clone(),
            noise_key: c.noise.clone(),
            adv_secret_key: [8u8; 32],
        };

        assert!(PairUtils::do_pair_crypto(&state, &identity).is_err());
    }
}
