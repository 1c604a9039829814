//! Browser callers: Supabase access tokens signed with real ES256 and RS256
//! keys generated here, the project's JWKS served by a local server.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_pair::http::auth::supabase::{SupabaseTokens, TokenRefusal, TokenSubject};
use wa_pair::store::MemoryStore;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::TestApp;

const JWKS_PATH: &str = "/auth/v1/.well-known/jwks.json";

/// A signing key of the project: the private half signs tokens, the public
/// half is published in the JWKS under `kid`.
pub struct SigningKey {
    pub kid: String,
    algorithm: Algorithm,
    private: EncodingKey,
    pub public: Jwk,
}

impl SigningKey {
    /// A fresh P-256 key (ES256), as Supabase's asymmetric keys are by default.
    pub fn es256(kid: &str) -> Self {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rand08::rngs::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).expect("PEM");
        Self::from_private(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_pem(pem.as_bytes()),
        )
    }

    /// A fresh 2048-bit RSA key (RS256).
    pub fn rs256(kid: &str) -> Self {
        use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
        let secret = rsa::RsaPrivateKey::new(&mut rand08::rngs::OsRng, 2048).expect("RSA key");
        let pem = secret.to_pkcs1_pem(LineEnding::LF).expect("PEM");
        Self::from_private(
            kid,
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(pem.as_bytes()),
        )
    }

    fn from_private(
        kid: &str,
        algorithm: Algorithm,
        private: jsonwebtoken::errors::Result<EncodingKey>,
    ) -> Self {
        let private = private.expect("private key loads");
        let mut public = Jwk::from_encoding_key(&private, algorithm).expect("public JWK");
        public.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            algorithm,
            private,
            public,
        }
    }

    /// `claims` signed with this key, `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// `claims` signed with this key but claiming to be key `kid`.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        encode(&header, claims, &self.private).expect("token signs")
    }
}

/// A Supabase project as far as token checks go: its JWKS endpoint.
pub struct Project {
    pub server: MockServer,
}

impl Project {
    /// A project publishing `keys`.
    pub async fn publishing(keys: &[&SigningKey]) -> Self {
        let project = Self {
            server: MockServer::start().await,
        };
        project.publish(keys).await;
        project
    }

    /// From now on the JWKS lists exactly `keys`.
    pub async fn publish(&self, keys: &[&SigningKey]) {
        self.server.reset().await;
        let set = JwkSet {
            keys: keys.iter().map(|key| key.public.clone()).collect(),
        };
        Mock::given(method("GET"))
            .and(path(JWKS_PATH))
            .respond_with(ResponseTemplate::new(200).set_body_json(&set))
            .mount(&self.server)
            .await;
    }

    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// A signed-in user's access-token claims, valid for an hour.
    pub fn user_claims(&self, user: &str) -> Value {
        json!({
            "iss": format!("{}/auth/v1", self.url()),
            "aud": "authenticated",
            "sub": user,
            "role": "authenticated",
            "exp": get_current_timestamp() + 3600,
            "iat": get_current_timestamp(),
        })
    }

    /// How many times the JWKS was fetched.
    pub async fn jwks_fetches(&self) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path() == JWKS_PATH)
            .count()
    }
}

/// The service with `project`'s users as its callers.
pub async fn app_for(project: &Project) -> TestApp {
    let url = project.url();
    TestApp::spawn_with(Arc::new(MemoryStore::new()), move |config| {
        config.supabase_url = Some(url);
    })
    .await
}

async fn pair_as(app: &TestApp, token: &str, phone: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/pair", app.base))
        .bearer_auth(token)
        .json(&json!({ "phone": phone }))
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn signed_in_users_pair_with_es256_and_rs256_tokens() {
    // Arrange
    let ec = SigningKey::es256("ec-1");
    let rsa = SigningKey::rs256("rsa-1");
    let project = Project::publishing(&[&ec, &rsa]).await;
    let app = app_for(&project).await;

    // Act
    let by_ec = pair_as(
        &app,
        &ec.sign(&project.user_claims("user-a")),
        "628111111111",
    )
    .await;
    let by_rsa = pair_as(
        &app,
        &rsa.sign(&project.user_claims("user-b")),
        "628222222222",
    )
    .await;

    // Assert
    assert_eq!(by_ec.status(), StatusCode::CREATED);
    assert_eq!(by_rsa.status(), StatusCode::CREATED);
    assert_eq!(project.jwks_fetches().await, 1, "keys are cached");
}

#[tokio::test]
async fn expired_foreign_and_misaddressed_tokens_are_refused_with_401() {
    // Arrange
    let key = SigningKey::es256("ec-1");
    let stranger = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    let app = app_for(&project).await;
    let mut expired = project.user_claims("user-a");
    expired["exp"] = json!(get_current_timestamp() - 600);
    let mut other_audience = project.user_claims("user-a");
    other_audience["aud"] = json!("anon");
    let mut other_project = project.user_claims("user-a");
    other_project["iss"] = json!("https://other.supabase.co/auth/v1");

    // Act
    let tokens = [
        key.sign(&expired),
        stranger.sign(&project.user_claims("user-a")),
        key.sign(&other_audience),
        key.sign(&other_project),
        key.sign_as("never-published", &project.user_claims("user-a")),
    ];
    let mut answers = Vec::new();
    for token in &tokens {
        answers.push(pair_as(&app, token, "628111111111").await);
    }

    // Assert
    for answer in answers {
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers()["www-authenticate"], "Bearer");
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"], "unauthorized");
        assert!(
            !body.to_string().contains("expired") && !body.to_string().contains("audience"),
            "the reason stays in the log: {body}"
        );
    }
    assert!(
        app.fake().record("628111111111").is_none(),
        "WhatsApp was never asked for a code"
    );
}

#[tokio::test]
async fn a_service_role_token_is_a_server_caller() {
    // Arrange
    let key = SigningKey::rs256("rsa-1");
    let project = Project::publishing(&[&key]).await;
    let tokens = SupabaseTokens::new(&project.url(), None);
    let claims = json!({
        "iss": format!("{}/auth/v1", project.url()),
        "role": "service_role",
        "exp": get_current_timestamp() + 600,
    });

    // Act
    let verified = tokens.verify(&key.sign(&claims)).await;

    // Assert
    assert_eq!(verified, Ok(TokenSubject::ServiceRole));
}

#[tokio::test]
async fn a_rotated_in_key_is_picked_up_on_its_first_token() {
    // Arrange
    let old = SigningKey::es256("old");
    let new = SigningKey::es256("new");
    let project = Project::publishing(&[&old]).await;
    let tokens = SupabaseTokens::new(&project.url(), None).with_refetch_interval(Duration::ZERO);
    let before = tokens.verify(&old.sign(&project.user_claims("u"))).await;

    // Act
    project.publish(&[&old, &new]).await;
    let after = tokens.verify(&new.sign(&project.user_claims("u"))).await;

    // Assert
    assert_eq!(before, Ok(TokenSubject::User("u".into())));
    assert_eq!(after, Ok(TokenSubject::User("u".into())));
}

#[tokio::test]
async fn unknown_kids_refetch_the_jwks_at_most_once_per_interval() {
    // Arrange
    let key = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    let tokens = SupabaseTokens::new(&project.url(), None);
    let claims = project.user_claims("u");
    assert!(tokens.verify(&key.sign(&claims)).await.is_ok());

    // Act
    let mut refusals = Vec::new();
    for n in 0..20 {
        refusals.push(
            tokens
                .verify(&key.sign_as(&format!("made-up-{n}"), &claims))
                .await,
        );
    }

    // Assert
    assert!(refusals.iter().all(|r| *r == Err(TokenRefusal::UnknownKey)));
    assert_eq!(
        project.jwks_fetches().await,
        1,
        "the first fetch was under a minute ago, so no made-up kid fetches again"
    );
}

#[tokio::test]
async fn an_unreachable_jwks_refuses_in_bounded_time_instead_of_hanging() {
    // Arrange
    let key = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    project.server.reset().await;
    Mock::given(method("GET"))
        .and(path(JWKS_PATH))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&project.server)
        .await;
    let tokens = SupabaseTokens::new(&project.url(), None);

    // Act
    let started = std::time::Instant::now();
    let refused = tokens.verify(&key.sign(&project.user_claims("u"))).await;

    // Assert
    assert_eq!(refused, Err(TokenRefusal::KeysUnavailable));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_user_cannot_read_refresh_cancel_or_join_another_users_session() {
    // Arrange
    let key = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    let app = app_for(&project).await;
    let alice = key.sign(&project.user_claims("alice"));
    let bob = key.sign(&project.user_claims("bob"));
    let phone = "628111111111";
    let url = |path: &str| format!("{}{path}", app.base);
    assert_eq!(
        pair_as(&app, &alice, phone).await.status(),
        StatusCode::CREATED
    );

    // Act
    let read = app
        .http
        .get(url(&format!("/pair/{phone}")))
        .bearer_auth(&bob);
    let refresh = app
        .http
        .post(url(&format!("/pair/{phone}/refresh")))
        .bearer_auth(&bob);
    let cancel = app
        .http
        .delete(url(&format!("/pair/{phone}")))
        .bearer_auth(&bob);
    let mut answers = Vec::new();
    for request in [read, refresh, cancel] {
        answers.push(request.send().await.expect("sent"));
    }
    answers.push(pair_as(&app, &bob, phone).await);
    answers.push(
        app.http
            .post(url("/pair"))
            .bearer_auth(&bob)
            .json(&json!({ "phone": "628333333333", "force": true }))
            .send()
            .await
            .expect("sent"),
    );
    let own_read = app
        .http
        .get(url(&format!("/pair/{phone}")))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("sent");

    // Assert
    for answer in answers {
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"], "forbidden");
    }
    assert_eq!(own_read.status(), StatusCode::OK);
    let state: Value = own_read.json().await.expect("JSON");
    assert_eq!(state["status"], "pending", "bob's DELETE changed nothing");
}

#[tokio::test]
async fn a_thousand_posts_from_one_user_cannot_lock_out_another_user() {
    // Arrange
    let key = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    let app = app_for(&project).await;
    let greedy = key.sign(&project.user_claims("greedy"));
    let other = key.sign(&project.user_claims("other"));

    // Act
    let answers: Vec<StatusCode> = futures::stream::iter(0..1000)
        .map(|n| {
            let (app, greedy) = (&app, &greedy);
            async move { pair_as(app, greedy, &format!("6281{n:08}")).await.status() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let others = pair_as(&app, &other, "628999999999").await;

    // Assert
    let created = answers
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let limited = answers
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(created, wa_pair::config::DEFAULT_SESSIONS_PER_USER);
    assert_eq!(created + limited, 1000, "{answers:?}");
    assert_eq!(others.status(), StatusCode::CREATED);
    assert_eq!(app.sessions.counts().live, created + 1);
}
