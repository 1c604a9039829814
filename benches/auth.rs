//! What checking callers costs: `GET /pair/{phone}` throughput with no
//! callers configured, with an API key, and with a Supabase access token
//! (ES256, verified against a JWKS served locally), in the same run.
//!
//! Run with `cargo bench --bench auth`. The service runs in-process with
//! the real router and sessions; the phone has no session, so each request
//! is: accept, caller check, rate-limit check, a registry look-up, a memory
//! store read, a 404. Rounds alternate between the three set-ups and the
//! report gives the median of each and its ratio to "no callers", so drift
//! of the machine shows up in all three alike. Rate limits are set out of
//! reach: a 429 would be cheaper than the work measured. Each connection
//! sends one token over and over, as a polling page does, so the Supabase
//! figure includes the memory of verified tokens.

mod common;

use std::time::{Duration, Instant};

use fake_wa::FakeWhatsApp;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use wa_pair::config::{Config, Secret};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Concurrent keep-alive connections per round.
const CONNECTIONS: usize = 32;
/// Length of one round.
const ROUND: Duration = Duration::from_secs(3);
/// Rounds per set-up; the median is reported.
const ROUNDS: usize = 5;
const API_KEY: &str = "bench-key-0123456789abcdef0123456789abcdef";
const PHONE: &str = "628123456789";

/// One way of calling the service.
struct Setup {
    label: &'static str,
    base: String,
    bearer: Option<String>,
    service: common::Service,
}

#[tokio::main]
async fn main() {
    let fake = FakeWhatsApp::start().await.expect("fake whatsapp");
    let data_dir = tempfile::tempdir().expect("temp dir");
    let jwks = MockServer::start().await;
    let token = publish_signing_key(&jwks).await;

    let open = serve("no callers", &fake, data_dir.path(), |_| {}, None).await;
    let keyed = serve(
        "API key",
        &fake,
        data_dir.path(),
        |config| config.api_keys = vec![Secret::new(API_KEY)],
        Some(API_KEY.to_owned()),
    )
    .await;
    let jwks_url = jwks.uri();
    let supabase = serve(
        "Supabase token (ES256)",
        &fake,
        data_dir.path(),
        move |config| config.supabase_url = Some(jwks_url),
        Some(token),
    )
    .await;
    let setups = [open, keyed, supabase];

    // Warm-up: connections, the JWKS fetch, lazy statics.
    for setup in &setups {
        round(setup, Duration::from_millis(500)).await;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for _ in 0..ROUNDS {
        for (n, setup) in setups.iter().enumerate() {
            rates[n].push(round(setup, ROUND).await);
        }
    }

    println!(
        "GET /pair/{{phone}} (404), {CONNECTIONS} connections, {ROUNDS} rounds of {} s each",
        ROUND.as_secs()
    );
    let baseline = median(&mut rates[0].clone());
    for (setup, rates) in setups.iter().zip(rates.iter_mut()) {
        let median = median(rates);
        println!(
            "{:<24} median {:>8.0} req/s  ({:.3}x of no callers; rounds: {})",
            setup.label,
            median,
            median / baseline,
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for setup in setups {
        let _ = setup.service.stop.send(());
        let _ = setup.service.server.await;
    }
}

/// Starts the service with `tweak` applied; requests carry `bearer`.
async fn serve(
    label: &'static str,
    fake: &FakeWhatsApp,
    data_dir: &std::path::Path,
    tweak: impl FnOnce(&mut Config),
    bearer: Option<String>,
) -> Setup {
    let mut config = Config {
        port: 0,
        data_dir: data_dir.to_path_buf(),
        starts_per_minute: 100_000_000,
        reads_per_minute: 100_000_000,
        ..Config::default()
    };
    tweak(&mut config);
    let service = common::serve(&config, &fake.ws_url()).await;
    Setup {
        label,
        base: service.base.clone(),
        bearer,
        service,
    }
}

/// `CONNECTIONS` clients asking as fast as they can for `length`; the
/// answers per second. Anything but a 404 is a broken set-up.
async fn round(setup: &Setup, length: Duration) -> f64 {
    let url = format!("{}/pair/{PHONE}", setup.base);
    let until = Instant::now() + length;
    let workers = (0..CONNECTIONS).map(|_| {
        let url = url.clone();
        let bearer = setup.bearer.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("client");
            let mut answered = 0u64;
            while Instant::now() < until {
                let mut request = http.get(&url);
                if let Some(bearer) = &bearer {
                    request = request.bearer_auth(bearer);
                }
                let status = request.send().await.expect("answered").status();
                assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "set-up is broken");
                answered += 1;
            }
            answered
        })
    });
    let started = Instant::now();
    let mut total = 0;
    for worker in futures::future::join_all(workers).await {
        total += worker.expect("worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Publishes a fresh ES256 key on `jwks` as Supabase would; a user's
/// access token signed with it.
async fn publish_signing_key(jwks: &MockServer) -> String {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rand08::rngs::OsRng);
    let pem = secret.to_pkcs8_pem(LineEnding::LF).expect("PEM");
    let private = EncodingKey::from_ec_pem(pem.as_bytes()).expect("key");
    let mut public = Jwk::from_encoding_key(&private, Algorithm::ES256).expect("JWK");
    public.common.key_id = Some("bench".into());
    Mock::given(method("GET"))
        .and(path("/auth/v1/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(JwkSet { keys: vec![public] }))
        .mount(jwks)
        .await;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    let claims = serde_json::json!({
        "iss": format!("{}/auth/v1", jwks.uri()),
        "aud": "authenticated",
        "sub": "bench-user",
        "exp": get_current_timestamp() + 3600,
    });
    encode(&header, &claims, &private).expect("token")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
