//! Who is calling: the `Authorization: Bearer …` header resolved once, at
//! the edge, into a [`Caller`] that handlers receive.
//!
//! - Server callers (edge functions, backends) send one of `API_KEYS`, or
//!   the project's `SUPABASE_SERVICE_ROLE_KEY`. Keys are compared as SHA-256
//!   digests in constant time, so neither a key's content nor its length
//!   leaks through timing, and they are never logged.
//! - Browser callers send their Supabase access token, verified by
//!   [`supabase::SupabaseTokens`]; a token with `role: service_role` is a
//!   server caller too.
//!
//! `EventSource` and `<img>` cannot send headers, so the event stream and
//! the QR pictures also take the token as `?access_token=`; the request log
//! never records query strings.
//!
//! With no caller configured (only allowed on loopback, or with
//! `ALLOW_UNAUTHENTICATED=true`), every caller is [`Caller::Anonymous`].

pub mod supabase;

use std::sync::Arc;

use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use self::supabase::{SupabaseTokens, TokenRefusal, TokenSubject};
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
    /// A user signed in to the Supabase project.
    User {
        /// The Supabase user id (`sub`). Kept in memory as the owner of the
        /// user's sessions, never written to the store.
        id: String,
    },
    /// Nobody in particular: no caller is configured.
    Anonymous,
}

/// `key_id` of a caller holding the project's service-role key (or a token
/// with `role: service_role`).
pub const SERVICE_ROLE_KEY_ID: &str = "supabase-service-role";

/// The credentials callers are checked against.
#[derive(Clone, Default)]
pub struct Callers {
    /// SHA-256 of each server key with the id it is known by: `API_KEYS` in
    /// order, then the service-role key.
    key_digests: Arc<[([u8; 32], String)]>,
    /// Verifies Supabase access tokens, when `SUPABASE_URL` is set.
    tokens: Option<Arc<SupabaseTokens>>,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("server_keys", &self.key_digests.len())
            .field("supabase", &self.tokens)
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
    /// A bearer token that matches no key and is no JWT.
    UnknownKey,
    /// A JWT that does not verify, or is not for us.
    Token(TokenRefusal),
}

impl Refusal {
    /// A description for the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "no Authorization header",
            Self::Malformed => "Authorization is not `Bearer <token>`",
            Self::UnknownKey => "bearer token matches no API key",
            Self::Token(refusal) => refusal.as_str(),
        }
    }
}

impl Callers {
    /// Server callers hold one of `api_keys` or the `service_role_key`;
    /// users hold a token that `tokens` verifies. With none of them,
    /// everyone is anonymous.
    pub fn new(
        api_keys: &[Secret],
        service_role_key: Option<&Secret>,
        tokens: Option<SupabaseTokens>,
    ) -> Self {
        let numbered = api_keys
            .iter()
            .enumerate()
            .map(|(n, key)| (digest(key.expose()), format!("key-{}", n + 1)));
        let service =
            service_role_key.map(|key| (digest(key.expose()), SERVICE_ROLE_KEY_ID.into()));
        Self {
            key_digests: numbered.chain(service).collect(),
            tokens: tokens.map(Arc::new),
        }
    }

    /// Whether requests must carry credentials.
    pub fn required(&self) -> bool {
        !self.key_digests.is_empty() || self.tokens.is_some()
    }

    /// Resolves the `Authorization` header's value into a caller.
    pub async fn resolve(&self, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        if !self.required() {
            return Ok(Caller::Anonymous);
        }
        let header = authorization.ok_or(Refusal::Missing)?;
        let token = bearer_token(header).ok_or(Refusal::Malformed)?;
        if let Some(key_id) = self.server_key(token) {
            return Ok(Caller::Server { key_id });
        }
        let Some(tokens) = &self.tokens else {
            return Err(Refusal::UnknownKey);
        };
        if !SupabaseTokens::looks_like_jwt(token) {
            return Err(Refusal::UnknownKey);
        }
        let token = std::str::from_utf8(token).map_err(|_| Refusal::Malformed)?;
        match tokens.verify(token).await.map_err(Refusal::Token)? {
            TokenSubject::User(id) => Ok(Caller::User { id }),
            TokenSubject::ServiceRole => Ok(Caller::Server {
                key_id: SERVICE_ROLE_KEY_ID.into(),
            }),
        }
    }

    /// The id of the server key `token` is, if any.
    fn server_key(&self, token: &[u8]) -> Option<String> {
        let presented = digest_bytes(token);
        // Every key is compared, so the time taken does not say which one
        // matched (or how far a guess got).
        let mut matched = None;
        for (key, id) in self.key_digests.iter() {
            if bool::from(key.ct_eq(&presented)) {
                matched = Some(id);
            }
        }
        matched.cloned()
    }
}

/// The query parameter a token may come in where a client cannot send
/// `Authorization` (RFC 6750's name).
pub const QUERY_TOKEN: &str = "access_token";

/// Paths (by ending) that take the token as [`QUERY_TOKEN`]: what a browser
/// loads without script control over headers (`EventSource`, `<img>`).
/// Everything else must use the header, so tokens stay out of URLs where
/// they are not needed.
const QUERY_TOKEN_PATHS: [&str; 3] = ["/events", "/qr.svg", "/qr.png"];

/// The token in `?access_token=`, on a `GET` of a path that takes one.
fn query_token(request: &Parts) -> Option<String> {
    if request.method != axum::http::Method::GET
        || !QUERY_TOKEN_PATHS
            .iter()
            .any(|end| request.uri.path().ends_with(end))
    {
        return None;
    }
    form_urlencoded::parse(request.uri.query()?.as_bytes())
        .find(|(name, _)| name == QUERY_TOKEN)
        .map(|(_, token)| token.into_owned())
        .filter(|token| !token.is_empty())
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

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        // Put there by `http::admit`; a route without it is a bug.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!("route reached without the caller middleware");
            ApiError::Internal
        })
    }
}

/// Who is calling: the first step of admitting a request to the API routes
/// (see `http::admit`). A refusal is logged here and answers 401.
pub async fn identify(callers: &Callers, request: &Parts) -> Result<Caller, ApiError> {
    let from_query = match request.headers.get(AUTHORIZATION) {
        Some(_) => None,
        None => query_token(request).map(|token| format!("Bearer {token}")),
    };
    let authorization = request
        .headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .or(from_query.as_deref().map(str::as_bytes));
    callers.resolve(authorization).await.map_err(|refusal| {
        tracing::warn!(
            request_id = crate::http::request_id(&request.headers),
            reason = refusal.as_str(),
            event = "unauthorized",
            "request refused"
        );
        ApiError::Unauthorized
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_1: &str = "0123456789abcdef0123456789abcdef";
    const KEY_2: &str = "fedcba9876543210fedcba9876543210";

    fn callers() -> Callers {
        Callers::new(&[Secret::new(KEY_1), Secret::new(KEY_2)], None, None)
    }

    #[tokio::test]
    async fn a_configured_key_is_a_server_caller_named_by_its_position() {
        let caller = callers()
            .resolve(Some(format!("Bearer {KEY_2}").as_bytes()))
            .await;

        assert_eq!(
            caller,
            Ok(Caller::Server {
                key_id: "key-2".into()
            })
        );
    }

    #[tokio::test]
    async fn the_scheme_is_case_insensitive_and_blanks_around_the_token_are_ignored() {
        let caller = callers()
            .resolve(Some(format!("bearer   {KEY_1} ").as_bytes()))
            .await;

        assert!(matches!(caller, Ok(Caller::Server { .. })), "{caller:?}");
    }

    #[tokio::test]
    async fn missing_malformed_and_unknown_credentials_are_refused_with_their_reason() {
        let callers = callers();
        let refused = |header: Option<Vec<u8>>| {
            let callers = callers.clone();
            async move { callers.resolve(header.as_deref()).await }
        };

        assert_eq!(refused(None).await, Err(Refusal::Missing));
        assert_eq!(refused(Some(KEY_1.into())).await, Err(Refusal::Malformed));
        assert_eq!(
            refused(Some(format!("Basic {KEY_1}").into())).await,
            Err(Refusal::Malformed)
        );
        assert_eq!(
            refused(Some(b"Bearer ".to_vec())).await,
            Err(Refusal::Malformed)
        );
        assert_eq!(
            refused(Some(format!("Bearer {KEY_1}x").into())).await,
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            refused(Some(format!("Bearer {}", &KEY_1[..31]).into())).await,
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            refused(Some(b"Bearer a.b.c".to_vec())).await,
            Err(Refusal::UnknownKey),
            "a JWT with no Supabase project configured"
        );
    }

    #[tokio::test]
    async fn with_no_key_configured_everyone_is_anonymous() {
        let open = Callers::new(&[], None, None);

        assert!(!open.required());
        assert_eq!(open.resolve(None).await, Ok(Caller::Anonymous));
        assert_eq!(
            open.resolve(Some(b"Bearer whatever")).await,
            Ok(Caller::Anonymous)
        );
    }

    #[tokio::test]
    async fn the_service_role_key_is_a_server_caller_of_its_own() {
        let service_key = Secret::new("sb_secret_the-projects-service-role-key");
        let callers = Callers::new(&[], Some(&service_key), None);

        let caller = callers
            .resolve(Some(b"Bearer sb_secret_the-projects-service-role-key"))
            .await;

        assert_eq!(
            caller,
            Ok(Caller::Server {
                key_id: SERVICE_ROLE_KEY_ID.into()
            })
        );
    }

    #[test]
    fn debug_output_shows_how_many_keys_not_which() {
        let printed = format!("{:?}", callers());

        assert!(!printed.contains(KEY_1), "{printed}");
        assert!(printed.contains('2'), "{printed}");
    }
}
