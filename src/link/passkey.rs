//! Linking an account that has a passkey: WhatsApp asks the companion for a
//! WebAuthn assertion made with the account's passkey before it links it,
//! then both screens show a verification code the person compares.
//!
//! - [`PasskeyOptions`]: what WhatsApp asks for (the WebAuthn request
//!   options, as `navigator.credentials.get({ publicKey })` takes them once
//!   their base64url fields are decoded).
//! - [`PasskeyAssertion`]: the answer, parsed from WebAuthn's standard
//!   `AuthenticationResponseJSON` ([`AuthenticationResponseJson`]).
//! - [`VerificationCode`]: the code both screens show; redacted like a
//!   pairing code.
//!
//! WebAuthn binds an assertion to its relying party: WhatsApp's options name
//! `rpId: "web.whatsapp.com"`, so only a page on that domain, or an app the
//! platform lets speak for it (Android's Credential Manager with WhatsApp's
//! asset links, say), can make one. A page on any other origin cannot.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::Deserialize;

/// WhatsApp's WebAuthn request options (`PublicKeyCredentialRequestOptions`
/// in its JSON form: `challenge`, `rpId`, `allowCredentials`,
/// `userVerification`, `timeout`), kept verbatim for a host app to pass to
/// its authenticator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeyOptions(serde_json::Value);

impl PasskeyOptions {
    /// Parses the options JSON WhatsApp sent; `None` when it is not a JSON
    /// object with a `challenge`.
    pub fn parse(json: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        value.get("challenge")?.as_str()?;
        Some(Self(value))
    }

    /// The options as JSON.
    pub fn as_json(&self) -> &serde_json::Value {
        &self.0
    }
}

/// The code both the companion and the phone show during a passkey link
/// (`ABCD-EFGH`): the person checks they match before confirming.
/// `Debug` and `Display` are redacted; [`VerificationCode::expose`] gives
/// it to the API.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationCode(String);

impl VerificationCode {
    /// Wraps the code as the link client derived it.
    pub fn new(code: impl Into<String>) -> Self {
        Self(code.into())
    }

    /// The code, `ABCD-EFGH`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for VerificationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerificationCode([redacted])")
    }
}

/// WebAuthn's `AuthenticationResponseJSON`: what
/// `PublicKeyCredential.toJSON()` gives after `navigator.credentials.get()`
/// (and what Android's Credential Manager returns as
/// `authenticationResponseJson`). Binary fields are base64url.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationResponseJson {
    /// The credential id, base64url.
    pub id: String,
    /// The same id (`rawId`), base64url.
    pub raw_id: String,
    /// Always `public-key`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The authenticator's answer.
    pub response: AuthenticatorAssertionResponseJson,
    /// `platform` or `cross-platform`; not used.
    #[serde(default)]
    pub authenticator_attachment: Option<String>,
    /// Extension outputs; not used.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub client_extension_results: Option<serde_json::Value>,
}

/// The `response` of an [`AuthenticationResponseJson`].
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticatorAssertionResponseJson {
    /// The client data the browser signed over, base64url.
    #[serde(rename = "clientDataJSON")]
    pub client_data_json: String,
    /// The authenticator data, base64url.
    pub authenticator_data: String,
    /// The signature, base64url.
    pub signature: String,
    /// The user handle, base64url, when the authenticator returned one.
    #[serde(default)]
    pub user_handle: Option<String>,
}

/// A WebAuthn assertion, decoded and checked for shape (WhatsApp checks the
/// signature). Serializable so a process can relay it to the one that runs
/// the session.
#[derive(Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct PasskeyAssertion {
    /// The credential's raw id.
    pub credential_id: Vec<u8>,
    /// The client data JSON, as signed.
    pub client_data_json: Vec<u8>,
    /// The authenticator data, as signed.
    pub authenticator_data: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    /// The user handle, if any.
    pub user_handle: Option<Vec<u8>>,
}

impl fmt::Debug for PasskeyAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasskeyAssertion").finish_non_exhaustive()
    }
}

/// Why an `AuthenticationResponseJSON` is not an assertion; the text is
/// safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AssertionError(String);

impl PasskeyAssertion {
    /// Decodes `response`: every binary field base64url (padded or not),
    /// `type` `public-key`, `id` the same credential as `rawId`, the client
    /// data a JSON `webauthn.get`.
    pub fn parse(response: &AuthenticationResponseJson) -> Result<Self, AssertionError> {
        if response.kind != "public-key" {
            return Err(AssertionError("`type` must be \"public-key\"".into()));
        }
        let credential_id = decode("rawId", &response.raw_id)?;
        if decode("id", &response.id)? != credential_id {
            return Err(AssertionError(
                "`id` and `rawId` name different credentials".into(),
            ));
        }
        let fields = &response.response;
        let client_data_json = decode("response.clientDataJSON", &fields.client_data_json)?;
        let client_data: serde_json::Value = serde_json::from_slice(&client_data_json)
            .map_err(|_| AssertionError("`response.clientDataJSON` is not JSON".into()))?;
        if client_data.get("type").and_then(|t| t.as_str()) != Some("webauthn.get") {
            return Err(AssertionError(
                "`response.clientDataJSON` is not from navigator.credentials.get()".into(),
            ));
        }
        Ok(Self {
            credential_id,
            client_data_json,
            authenticator_data: decode("response.authenticatorData", &fields.authenticator_data)?,
            signature: decode("response.signature", &fields.signature)?,
            user_handle: fields
                .user_handle
                .as_deref()
                .map(|handle| decode("response.userHandle", handle))
                .transpose()?,
        })
    }
}

/// A non-empty base64url field.
fn decode(field: &str, value: &str) -> Result<Vec<u8>, AssertionError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(value)
        .or_else(|_| URL_SAFE.decode(value))
        .map_err(|_| AssertionError(format!("`{field}` is not base64url")))?;
    if bytes.is_empty() {
        return Err(AssertionError(format!("`{field}` is empty")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn response() -> AuthenticationResponseJson {
        serde_json::from_value(serde_json::json!({
            "id": b64(b"credential"),
            "rawId": b64(b"credential"),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(br#"{"type":"webauthn.get","challenge":"abc"}"#),
                "authenticatorData": b64(&[1; 37]),
                "signature": b64(&[2; 70]),
                "userHandle": null,
            },
            "clientExtensionResults": {},
        }))
        .unwrap()
    }

    #[test]
    fn a_browsers_authentication_response_parses_into_its_parts() {
        let assertion = PasskeyAssertion::parse(&response()).unwrap();

        assert_eq!(assertion.credential_id, b"credential");
        assert_eq!(assertion.authenticator_data, [1; 37]);
        assert_eq!(assertion.signature, [2; 70]);
        assert_eq!(assertion.user_handle, None);
    }

    #[test]
    fn padded_base64url_is_accepted_too() {
        let mut padded = response();
        padded.response.signature = URL_SAFE.encode([2; 70]);

        assert!(PasskeyAssertion::parse(&padded).is_ok());
    }

    #[test]
    fn an_assertion_naming_two_credentials_is_refused() {
        let mut mixed = response();
        mixed.id = b64(b"another");

        let refused = PasskeyAssertion::parse(&mixed).unwrap_err();

        assert!(refused.to_string().contains("different credentials"));
    }

    #[test]
    fn a_registration_response_is_not_an_assertion() {
        let mut created = response();
        created.response.client_data_json = b64(br#"{"type":"webauthn.create"}"#);

        let refused = PasskeyAssertion::parse(&created).unwrap_err();

        assert!(refused.to_string().contains("navigator.credentials.get"));
    }

    #[test]
    fn a_field_that_is_not_base64url_is_named_in_the_refusal() {
        let mut broken = response();
        broken.response.authenticator_data = "not base64!".into();

        let refused = PasskeyAssertion::parse(&broken).unwrap_err();

        assert!(refused.to_string().contains("authenticatorData"));
    }

    #[test]
    fn options_without_a_challenge_are_not_options() {
        assert!(PasskeyOptions::parse(r#"{"rpId":"web.whatsapp.com"}"#).is_none());
        assert!(PasskeyOptions::parse(r#"{"challenge":"abc"}"#).is_some());
    }

    #[test]
    fn a_verification_code_never_prints_itself() {
        let code = VerificationCode::new("ABCD-EFGH");

        assert!(!format!("{code:?}").contains("ABCD"));
    }
}
