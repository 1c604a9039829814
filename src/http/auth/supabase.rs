//! Supabase access tokens: the JWT a signed-in browser sends, checked the
//! way Supabase's own API gateway checks it.
//!
//! - Asymmetric keys (ES256, RS256): the project's public keys come from its
//!   JWKS, `${SUPABASE_URL}/auth/v1/.well-known/jwks.json`. They are cached;
//!   a token with a `kid` the cache does not know makes us fetch the JWKS
//!   again (Supabase publishes a new key before it signs with it), but at
//!   most once per [`JWKS_REFETCH_INTERVAL`], so a stream of made-up `kid`s
//!   cannot turn the service into a load generator against Supabase.
//! - The legacy shared secret (HS256, `SUPABASE_JWT_SECRET`).
//!
//! Signature, `exp` and `nbf` are checked by `jsonwebtoken`; `iss`, `aud`
//! and `role` are checked here so the log can say which one failed.

use std::collections::HashMap;
use std::sync::Mutex as SyncMutex;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::Secret;

/// Least time between two JWKS fetches. Supabase rotates keys rarely and
/// publishes the next one in advance, so one fetch a minute picks up a
/// rotation quickly while bounding what unknown `kid`s can cost.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Longest a JWKS fetch may take; a request waiting on it is held that long
/// at most, and then refused rather than hung.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted. Supabase's holds a handful of keys in a
/// few KiB; anything much bigger is not a key set.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Clock skew tolerated on `exp` and `nbf`, between Supabase's clock and ours.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(30);
/// How long a verified token is remembered. A page polls with the same
/// token every second or two, and an ES256 signature check costs about ten
/// times a whole `GET` (see the auth benchmark); a minute bounds how long a
/// token stays accepted after its key is withdrawn, like the JWKS refetch.
pub const VERIFIED_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Most verified tokens remembered; past it the memory is cleared (the
/// next request of each caller verifies again).
pub const MAX_VERIFIED_TOKENS: usize = 10_000;
/// The audience of a signed-in user's access token.
pub const USER_AUDIENCE: &str = "authenticated";
/// The `role` claim of a token that speaks for the project itself.
pub const SERVICE_ROLE: &str = "service_role";
/// The issuer of Supabase's legacy `anon`/`service_role` API keys (JWTs
/// signed with the shared secret, carrying no audience).
pub const LEGACY_KEY_ISSUER: &str = "supabase";

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSubject {
    /// A signed-in user, by their Supabase user id (`sub`).
    User(String),
    /// The project itself (`role: service_role`).
    ServiceRole,
}

/// Why a token was refused; for the log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a JWT, or claims of the wrong shape.
    Malformed,
    /// Signed with an algorithm we do not accept for this project.
    Algorithm,
    /// No key with the token's `kid` (after a refetch, if one was allowed).
    UnknownKey,
    /// The signature does not verify with the project's key.
    BadSignature,
    /// Past its `exp`.
    Expired,
    /// Before its `nbf`.
    NotYetValid,
    /// `iss` is not this project's.
    WrongIssuer,
    /// `aud` is not `authenticated`.
    WrongAudience,
    /// A user token without a `sub`.
    NoSubject,
    /// The JWKS could not be fetched and no cached key fits.
    KeysUnavailable,
}

impl TokenRefusal {
    /// A short description for the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "token is not a well-formed JWT",
            Self::Algorithm => "token algorithm is not accepted",
            Self::UnknownKey => "token kid matches no key of the project",
            Self::BadSignature => "token signature does not verify",
            Self::Expired => "token has expired",
            Self::NotYetValid => "token is not valid yet (nbf)",
            Self::WrongIssuer => "token issuer is not this project",
            Self::WrongAudience => "token audience is not `authenticated`",
            Self::NoSubject => "token has no subject",
            Self::KeysUnavailable => "project keys (JWKS) could not be fetched",
        }
    }
}

/// The claims we read. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    /// Required by the validation, so always there.
    exp: u64,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    role: Option<String>,
}

/// `aud` may be one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Self::One(aud) => aud == wanted,
            Self::Many(auds) => auds.iter().any(|aud| aud == wanted),
        }
    }
}

/// A public key of the project, ready to verify with.
struct ProjectKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// What the JWKS cache holds.
#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, ProjectKey>,
    /// When the JWKS was last asked for (successfully or not).
    fetched_at: Option<Instant>,
}

/// Verifies Supabase access tokens for one project.
pub struct SupabaseTokens {
    issuer: String,
    jwks_url: String,
    shared_secret: Option<DecodingKey>,
    http: reqwest::Client,
    /// Least time between two JWKS fetches ([`JWKS_REFETCH_INTERVAL`]).
    refetch_interval: Duration,
    /// An async lock: whoever finds an unknown `kid` fetches while the
    /// others wait for the result instead of fetching too.
    cache: Mutex<KeyCache>,
    /// Tokens verified lately, by SHA-256 of the token.
    verified: SyncMutex<HashMap<[u8; 32], Verified>>,
}

/// A token that passed every check.
#[derive(Clone)]
struct Verified {
    subject: TokenSubject,
    /// The token's `exp`, still checked on every use.
    exp: u64,
    at: Instant,
}

impl std::fmt::Debug for SupabaseTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupabaseTokens")
            .field("issuer", &self.issuer)
            .field("shared_secret", &self.shared_secret.is_some())
            .finish_non_exhaustive()
    }
}

impl SupabaseTokens {
    /// Tokens of the project at `project_url` (`https://<ref>.supabase.co`),
    /// with the legacy `shared_secret` if the project still has one.
    pub fn new(project_url: &str, shared_secret: Option<&Secret>) -> Self {
        let issuer = format!("{}/auth/v1", project_url.trim_end_matches('/'));
        let http = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .connect_timeout(JWKS_FETCH_TIMEOUT)
            .build()
            // Only fails when the TLS backend cannot initialise, which the
            // store's client would have hit first.
            .unwrap_or_default();
        Self {
            jwks_url: format!("{issuer}/.well-known/jwks.json"),
            issuer,
            shared_secret: shared_secret.map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            http,
            refetch_interval: JWKS_REFETCH_INTERVAL,
            cache: Mutex::default(),
            verified: SyncMutex::default(),
        }
    }

    /// The same verifier with another least time between JWKS fetches; for
    /// tests of key rotation, which cannot wait a minute.
    #[must_use]
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Whether `token` has the shape of a JWT (three dot-separated parts),
    /// as opposed to an API key.
    pub fn looks_like_jwt(token: &[u8]) -> bool {
        token.iter().filter(|&&b| b == b'.').count() == 2
    }

    /// Checks `token` and says whom it speaks for. A token verified within
    /// [`VERIFIED_TOKEN_TTL`] is not checked again, except for its expiry.
    pub async fn verify(&self, token: &str) -> Result<TokenSubject, TokenRefusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(subject) = self.remembered(&digest)? {
            return Ok(subject);
        }
        let (subject, exp) = self.check(token).await?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= MAX_VERIFIED_TOKENS {
            verified.clear();
            verified.shrink_to(MAX_VERIFIED_TOKENS);
        }
        verified.insert(
            digest,
            Verified {
                subject: subject.clone(),
                exp,
                at: Instant::now(),
            },
        );
        Ok(subject)
    }

    /// The subject of a token verified lately; `Err(Expired)` once its
    /// `exp` has passed.
    fn remembered(&self, digest: &[u8; 32]) -> Result<Option<TokenSubject>, TokenRefusal> {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let Some(found) = verified.get(digest).cloned() else {
            return Ok(None);
        };
        if found.at.elapsed() >= VERIFIED_TOKEN_TTL {
            verified.remove(digest);
            return Ok(None);
        }
        if jsonwebtoken::get_current_timestamp() > found.exp + CLOCK_LEEWAY.as_secs() {
            verified.remove(digest);
            return Err(TokenRefusal::Expired);
        }
        Ok(Some(found.subject))
    }

    /// Every check of `token`: its subject and `exp`.
    async fn check(&self, token: &str) -> Result<(TokenSubject, u64), TokenRefusal> {
        let header = decode_header(token).map_err(|_| TokenRefusal::Malformed)?;
        let (algorithm, key) = match header.alg {
            Algorithm::HS256 => {
                let secret = self.shared_secret.clone().ok_or(TokenRefusal::Algorithm)?;
                (Algorithm::HS256, secret)
            }
            Algorithm::ES256 | Algorithm::RS256 => {
                let kid = header.kid.as_deref().ok_or(TokenRefusal::UnknownKey)?;
                let (algorithm, key) = self.project_key(kid).await?;
                if algorithm != header.alg {
                    return Err(TokenRefusal::Algorithm);
                }
                (algorithm, key)
            }
            _ => return Err(TokenRefusal::Algorithm),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = CLOCK_LEEWAY.as_secs();
        validation.validate_nbf = true;
        // Audience and issuer are checked below, where a legacy service key
        // (no audience) can be told apart from a user's token.
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into();
        let claims = decode::<Claims>(token, &key, &validation)
            .map_err(|e| refusal_of(e.kind()))?
            .claims;
        let exp = claims.exp;
        Ok((self.subject_of(claims)?, exp))
    }

    fn subject_of(&self, claims: Claims) -> Result<TokenSubject, TokenRefusal> {
        let issuer = claims.iss.as_deref();
        if claims.role.as_deref() == Some(SERVICE_ROLE) {
            return match issuer {
                Some(iss) if iss == self.issuer || iss == LEGACY_KEY_ISSUER => {
                    Ok(TokenSubject::ServiceRole)
                }
                _ => Err(TokenRefusal::WrongIssuer),
            };
        }
        if issuer != Some(self.issuer.as_str()) {
            return Err(TokenRefusal::WrongIssuer);
        }
        if !claims.aud.is_some_and(|aud| aud.contains(USER_AUDIENCE)) {
            return Err(TokenRefusal::WrongAudience);
        }
        match claims.sub {
            Some(sub) if !sub.is_empty() => Ok(TokenSubject::User(sub)),
            _ => Err(TokenRefusal::NoSubject),
        }
    }

    /// The project's key `kid`, fetching the JWKS when it is not cached and
    /// the last fetch is long enough ago.
    async fn project_key(&self, kid: &str) -> Result<(Algorithm, DecodingKey), TokenRefusal> {
        let mut cache = self.cache.lock().await;
        if let Some(found) = cache.keys.get(kid) {
            return Ok((found.algorithm, found.key.clone()));
        }
        let may_fetch = cache
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.refetch_interval);
        if !may_fetch {
            return Err(TokenRefusal::UnknownKey);
        }
        cache.fetched_at = Some(Instant::now());
        match self.fetch_keys().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "Supabase signing keys fetched");
                cache.keys = keys;
            }
            Err(error) => {
                // Keys already cached stay in use: a Supabase hiccup must
                // not sign everybody out.
                tracing::warn!(error = %error, "Supabase signing keys could not be fetched");
                return Err(TokenRefusal::KeysUnavailable);
            }
        }
        cache
            .keys
            .get(kid)
            .map(|found| (found.algorithm, found.key.clone()))
            .ok_or(TokenRefusal::UnknownKey)
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, ProjectKey>, String> {
        let mut response = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the answer failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("answer is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        Ok(usable_keys(&set))
    }
}

/// The ES256 and RS256 keys of `set` that carry a `kid`; others (HS256
/// entries Supabase lists without key material, unknown types) are skipped.
fn usable_keys(set: &JwkSet) -> HashMap<String, ProjectKey> {
    use jsonwebtoken::jwk::{AlgorithmParameters, KeyAlgorithm};
    set.keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let (algorithm, named) = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(_) => (Algorithm::ES256, KeyAlgorithm::ES256),
                AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
                _ => return None,
            };
            // A key published for another algorithm (say ES384) is not used
            // as ES256 or RS256.
            if jwk
                .common
                .key_algorithm
                .is_some_and(|declared| declared != named)
            {
                return None;
            }
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((kid, ProjectKey { algorithm, key }))
        })
        .collect()
}

fn refusal_of(kind: &jsonwebtoken::errors::ErrorKind) -> TokenRefusal {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => TokenRefusal::Expired,
        ErrorKind::ImmatureSignature => TokenRefusal::NotYetValid,
        ErrorKind::InvalidSignature => TokenRefusal::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => TokenRefusal::Algorithm,
        _ => TokenRefusal::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";
    const PROJECT: &str = "https://project.supabase.co";

    fn hs256(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("token encodes")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn tokens() -> SupabaseTokens {
        SupabaseTokens::new(PROJECT, Some(&Secret::new(SECRET)))
    }

    fn user_claims() -> serde_json::Value {
        json!({
            "iss": format!("{PROJECT}/auth/v1"),
            "aud": "authenticated",
            "sub": "5f1c7c1e-user",
            "role": "authenticated",
            "exp": now() + 3600,
        })
    }

    #[tokio::test]
    async fn a_user_token_signed_with_the_shared_secret_names_its_user() {
        let verified = tokens().verify(&hs256(user_claims())).await;

        assert_eq!(verified, Ok(TokenSubject::User("5f1c7c1e-user".into())));
    }

    #[tokio::test]
    async fn expiry_not_before_issuer_audience_and_subject_are_all_checked() {
        let tokens = tokens();
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = user_claims();
            claims[key] = value;
            hs256(claims)
        };
        let without = |key: &str| {
            let mut claims = user_claims();
            claims.as_object_mut().expect("object").remove(key);
            hs256(claims)
        };

        let cases = [
            (with("exp", json!(now() - 120)), TokenRefusal::Expired),
            (with("nbf", json!(now() + 600)), TokenRefusal::NotYetValid),
            (
                with("iss", json!("https://other.supabase.co/auth/v1")),
                TokenRefusal::WrongIssuer,
            ),
            (with("aud", json!("anon")), TokenRefusal::WrongAudience),
            (without("aud"), TokenRefusal::WrongAudience),
            (without("sub"), TokenRefusal::NoSubject),
            (without("exp"), TokenRefusal::Malformed),
        ];
        for (token, expected) in cases {
            assert_eq!(tokens.verify(&token).await, Err(expected));
        }
    }

    #[tokio::test]
    async fn a_token_within_the_clock_leeway_is_accepted() {
        let mut claims = user_claims();
        claims["exp"] = json!(now() - 5);

        assert!(tokens().verify(&hs256(claims)).await.is_ok());
    }

    #[tokio::test]
    async fn an_audience_list_that_includes_authenticated_is_accepted() {
        let mut claims = user_claims();
        claims["aud"] = json!(["other", "authenticated"]);

        assert!(tokens().verify(&hs256(claims)).await.is_ok());
    }

    #[tokio::test]
    async fn service_role_tokens_speak_for_the_project_including_legacy_keys() {
        let tokens = tokens();
        let legacy = hs256(json!({
            "iss": "supabase", "ref": "project", "role": "service_role", "exp": now() + 3600,
        }));
        let current = hs256(json!({
            "iss": format!("{PROJECT}/auth/v1"), "role": "service_role", "exp": now() + 3600,
        }));
        let foreign = hs256(json!({
            "iss": "https://evil.example/auth/v1", "role": "service_role", "exp": now() + 3600,
        }));

        assert_eq!(tokens.verify(&legacy).await, Ok(TokenSubject::ServiceRole));
        assert_eq!(tokens.verify(&current).await, Ok(TokenSubject::ServiceRole));
        assert_eq!(
            tokens.verify(&foreign).await,
            Err(TokenRefusal::WrongIssuer)
        );
    }

    #[tokio::test]
    async fn another_secret_or_no_secret_configured_refuses_hs256() {
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &user_claims(),
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        )
        .expect("token encodes");
        let no_secret = SupabaseTokens::new(PROJECT, None);

        assert_eq!(
            tokens().verify(&forged).await,
            Err(TokenRefusal::BadSignature)
        );
        assert_eq!(
            no_secret.verify(&hs256(user_claims())).await,
            Err(TokenRefusal::Algorithm)
        );
    }

    #[tokio::test]
    async fn garbage_and_unsigned_tokens_are_malformed_or_refused() {
        let tokens = tokens();
        let unsigned = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJ4In0"
        );

        assert_eq!(tokens.verify("a.b.c").await, Err(TokenRefusal::Malformed));
        assert!(tokens.verify(&unsigned).await.is_err());
    }

    #[tokio::test]
    async fn a_remembered_token_is_still_refused_once_expired() {
        let tokens = tokens();
        let mut claims = user_claims();
        claims["exp"] = json!(now() - CLOCK_LEEWAY.as_secs() + 1);
        let token = hs256(claims);
        assert!(tokens.verify(&token).await.is_ok(), "within the leeway");

        tokio::time::sleep(Duration::from_millis(2100)).await;
        let later = tokens.verify(&token).await;

        assert_eq!(later, Err(TokenRefusal::Expired));
    }

    #[tokio::test]
    async fn a_forged_token_is_not_let_in_by_the_memory_of_a_good_one() {
        let tokens = tokens();
        let good = hs256(user_claims());
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &user_claims(),
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        )
        .expect("token encodes");
        assert!(tokens.verify(&good).await.is_ok());

        assert_eq!(
            tokens.verify(&forged).await,
            Err(TokenRefusal::BadSignature)
        );
    }

    #[test]
    fn only_three_part_tokens_look_like_jwts() {
        assert!(SupabaseTokens::looks_like_jwt(b"a.b.c"));
        assert!(!SupabaseTokens::looks_like_jwt(
            b"0123456789abcdef0123456789abcdef"
        ));
        assert!(!SupabaseTokens::looks_like_jwt(b"a.b.c.d"));
    }
}
