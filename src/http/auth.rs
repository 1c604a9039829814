//! Who is calling: the `Authorization: Bearer …` header resolved once, at
//! the edge, into a [`Caller`] that handlers receive.
//!
//! Server callers (edge functions, backends) send one of `API_KEYS`. Keys
//! are compared as SHA-256 digests in constant time, so neither a key's
//! content nor its length leaks through timing, and they are never logged.
//! With no key configured (only allowed on loopback, or with
//! `ALLOW_UNAUTHENTICATED=true`), every caller is [`Caller::Anonymous`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::Secret;

/// Who made a request, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A server caller holding one of `API_KEYS`.
    Server {
        /// Which key: `key-1` for the first in `API_KEYS`, and so on. Safe
        /// to log and to record as a session's owner.
        key_id: String,
    },
    /// Nobody in particular: no caller is configured.
    Anonymous,
}

/// The credentials callers are checked against.
#[derive(Clone, Default)]
pub struct Callers {
    /// SHA-256 of each API key, in `API_KEYS` order.
    key_digests: Arc<[[u8; 32]]>,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("api_keys", &self.key_digests.len())
            .finish()
    }
}

/// Why a request was not let in; for the log, never the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// Not of the form `Bearer <token>`.
    Malformed,
    /// A bearer token that matches no key.
    UnknownKey,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "no Authorization header",
            Self::Malformed => "Authorization is not `Bearer <token>`",
            Self::UnknownKey => "bearer token matches no API key",
        }
    }
}

impl Callers {
    /// Checks callers against `api_keys`; with none, everyone is anonymous.
    pub fn new(api_keys: &[Secret]) -> Self {
        Self {
            key_digests: api_keys.iter().map(|k| digest(k.expose())).collect(),
        }
    }

    /// Whether requests must carry credentials.
    pub fn required(&self) -> bool {
        !self.key_digests.is_empty()
    }

    /// Resolves the `Authorization` header's value into a caller.
    pub fn resolve(&self, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        if !self.required() {
            return Ok(Caller::Anonymous);
        }
        let header = authorization.ok_or(Refusal::Missing)?;
        let token = bearer_token(header).ok_or(Refusal::Malformed)?;
        let presented = digest_bytes(token);
        // Every key is compared, so the time taken does not say which one
        // matched (or how far a guess got).
        let mut matched = None;
        for (n, key) in self.key_digests.iter().enumerate() {
            if bool::from(key.ct_eq(&presented)) {
                matched = Some(n);
            }
        }
        matched
            .map(|n| Caller::Server {
                key_id: format!("key-{}", n + 1),
            })
            .ok_or(Refusal::UnknownKey)
    }
}

/// `Bearer <token>` (scheme in any case, one or more spaces) → the token.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn digest(key: &str) -> [u8; 32] {
    digest_bytes(key.as_bytes())
}

fn digest_bytes(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Middleware for the API routes: lets a request in with its [`Caller`] in
/// the extensions, or answers 401.
pub async fn require_caller(
    State(callers): State<Callers>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    match callers.resolve(authorization) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            Ok(next.run(request).await)
        }
        Err(refusal) => {
            tracing::warn!(
                reason = refusal.as_str(),
                event = "unauthorized",
                "request refused"
            );
            Err(ApiError::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_1: &str = "0123456789abcdef0123456789abcdef";
    const KEY_2: &str = "fedcba9876543210fedcba9876543210";

    fn callers() -> Callers {
        Callers::new(&[Secret::new(KEY_1), Secret::new(KEY_2)])
    }

    #[test]
    fn a_configured_key_is_a_server_caller_named_by_its_position() {
        let caller = callers().resolve(Some(format!("Bearer {KEY_2}").as_bytes()));

        assert_eq!(
            caller,
            Ok(Caller::Server {
                key_id: "key-2".into()
            })
        );
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_blanks_around_the_token_are_ignored() {
        let caller = callers().resolve(Some(format!("bearer   {KEY_1} ").as_bytes()));

        assert!(matches!(caller, Ok(Caller::Server { .. })), "{caller:?}");
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_refused_with_their_reason() {
        let callers = callers();

        assert_eq!(callers.resolve(None), Err(Refusal::Missing));
        assert_eq!(
            callers.resolve(Some(KEY_1.as_bytes())),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            callers.resolve(Some(format!("Basic {KEY_1}").as_bytes())),
            Err(Refusal::Malformed)
        );
        assert_eq!(callers.resolve(Some(b"Bearer ")), Err(Refusal::Malformed));
        assert_eq!(
            callers.resolve(Some(format!("Bearer {KEY_1}x").as_bytes())),
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            callers.resolve(Some(&format!("Bearer {}", &KEY_1[..31]).into_bytes())),
            Err(Refusal::UnknownKey)
        );
    }

    #[test]
    fn with_no_key_configured_everyone_is_anonymous() {
        let open = Callers::new(&[]);

        assert!(!open.required());
        assert_eq!(open.resolve(None), Ok(Caller::Anonymous));
        assert_eq!(
            open.resolve(Some(b"Bearer whatever")),
            Ok(Caller::Anonymous)
        );
    }

    #[test]
    fn debug_output_shows_how_many_keys_not_which() {
        let printed = format!("{:?}", callers());

        assert!(!printed.contains(KEY_1), "{printed}");
        assert!(printed.contains('2'), "{printed}");
    }
}
