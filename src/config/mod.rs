//! Typed settings read from environment variables.
//!
//! [`Config::from_env`] reads the process environment (after loading a
//! `.env` file if there is one); [`Config::from_vars`] does the same work on
//! any list of name/value pairs, so tests never touch the process
//! environment. Every [`ConfigError`] names the variable and the expected
//! format. A variable set to the empty string counts as unset, so
//! `PORT=` in a compose file means "use the default".

mod settings;

use std::collections::HashMap;
use std::env::VarError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use self::settings::*;
pub use self::settings::{SETTINGS, Setting, SettingDefault};

/// Default [`Config::host`]: loopback, so a developer's `cargo run` is not
/// reachable from the network; the Dockerfile sets `HOST=0.0.0.0`.
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Default [`Config::port`]: the conventional unprivileged HTTP port that
/// container platforms expect.
pub const DEFAULT_PORT: u16 = 8080;

/// Default [`Config::log_format`]: JSON, because production log collectors
/// parse it; developers opt into `pretty`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Json;

/// Default [`Config::rust_log`]: our own lifecycle events at `info`, the
/// WhatsApp client library only when something goes wrong (its `info` is a
/// running commentary of every connection step).
pub const DEFAULT_RUST_LOG: &str = "info,whatsapp_rust=warn,wacore=warn,Client=warn";

/// Default [`Config::data_dir`]: relative to the working directory, so local
/// runs keep their state next to the checkout.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// Default [`Config::wa_sandbox`]: off, so nothing talks to a sandbox by accident.
pub const DEFAULT_WA_SANDBOX: bool = false;

/// Default [`Config::key_prefix`]: namespaces this service's keys in a Redis
/// shared with other services.
pub const DEFAULT_KEY_PREFIX: &str = "wa:pair:";

/// Default [`Config::code_ttl`]: 10 minutes, a little longer than a user
/// needs to open WhatsApp and type the code.
pub const DEFAULT_CODE_TTL: Duration = Duration::from_secs(600);

/// Default [`Config::refresh_every`]: 8 minutes, leaving 2 minutes of the
/// 10-minute code TTL to fetch a replacement before the stored code expires.
pub const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(480);

/// Default [`Config::code_wait`]: 20 seconds, long enough for WhatsApp to
/// hand out a code on a slow connection, short enough for an HTTP client.
pub const DEFAULT_CODE_WAIT: Duration = Duration::from_secs(20);

/// Default [`Config::sse_keepalive`]: 15 seconds, well inside the idle
/// timeouts of common proxies (Railway's, nginx's 60 s) and browsers.
pub const DEFAULT_SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Default [`Config::ui_enabled`]: on, so a person can pair from a browser
/// with nothing else deployed.
pub const DEFAULT_UI_ENABLED: bool = true;

/// Longest [`Config::sse_keepalive`]: a stream silent for longer than five
/// minutes is closed by nearly every proxy on the way.
pub const MAX_SSE_KEEPALIVE: Duration = Duration::from_secs(300);

/// Default [`Config::allow_unauthenticated`]: off, so a public address
/// needs callers configured.
pub const DEFAULT_ALLOW_UNAUTHENTICATED: bool = false;
/// Default for `PAIR_SESSIONS_PER_USER`: a person links one or two numbers
/// at a time; five leaves room for a retry on each without letting one
/// account take the service-wide cap.
pub const DEFAULT_SESSIONS_PER_USER: usize = 5;
/// Default for `PAIR_WARM_CLIENTS`: two ready clients serve two people who
/// start at the same moment, each costing one idle WhatsApp connection (its
/// device is in memory; figures in `docs/BENCHMARKS.md`).
pub const DEFAULT_WARM_CLIENTS: usize = 2;
/// Default for `HTTP_HEADER_TIMEOUT_SECS`: a real client sends its headers
/// in one packet; ten seconds covers a slow mobile link, and bounds how long
/// a client that sends nothing (or a byte at a time) holds a connection.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `HTTP_MAX_CONNECTIONS`: far above what the frontend and edge
/// functions need, well below the file descriptors the sessions need
/// (three each, up to 1000 sessions).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default for `RATE_LIMIT_STARTS_PER_MIN`: a person asks for a code, maybe
/// refreshes it, maybe for a second number; ten a minute is plenty for
/// that and stops a loop from making WhatsApp notify phones.
pub const DEFAULT_STARTS_PER_MINUTE: u32 = 10;
/// Default for `RATE_LIMIT_READS_PER_MIN`: a page polling every second
/// uses 60.
pub const DEFAULT_READS_PER_MINUTE: u32 = 120;
/// Default for `PAIR_CODES_PER_HOUR`: WhatsApp is reported to block a
/// number for hours after about seven codes; six keeps a person under that
/// with room for one refresh per screen they lose.
pub const DEFAULT_CODES_PER_HOUR: u32 = 6;
/// Default for `DEVICE_BACKUP_RETENTION_SECS`: a week to notice that a
/// re-link was a mistake and restore the old device's files.
pub const DEFAULT_BACKUP_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest API key accepted: 32 characters (e.g. 16 random bytes in hex)
/// cannot be guessed by trying.
pub const MIN_API_KEY_LEN: usize = 32;
/// Default [`Config::session_max`]: 30 minutes, after which an unlinked
/// pairing session is abandoned rather than holding a socket forever.
pub const DEFAULT_SESSION_MAX: Duration = Duration::from_secs(1800);

/// Default [`Config::outcome_ttl`]: one day, so a client polling late still
/// learns whether pairing was linked, failed or expired.
pub const DEFAULT_OUTCOME_TTL: Duration = Duration::from_secs(86_400);

/// Default [`Config::backoff_base`]: 1 second before the first retry, so a
/// transient failure is retried quickly.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(1000);

/// Default [`Config::backoff_cap`]: 1 minute, so repeated failures never
/// leave a session idle for longer than that between attempts.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_millis(60_000);

/// Default [`Config::max_attempts`]: 10 consecutive failures, which with the
/// default backoff spans several minutes, enough to ride out an outage blip.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

/// Default [`Config::shutdown_grace`]: 10 seconds, inside the usual 30-second
/// container stop timeout, so in-flight requests finish before a kill.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Longest duration any setting accepts: 365 days.
///
/// Far beyond any sensible TTL, yet small enough that `Instant + duration`
/// and Redis expiry arithmetic can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

const SECONDS: &str = "a whole number of seconds from 1 to 31536000";
const MILLISECONDS: &str = "a whole number of milliseconds from 1 to 31536000000";

/// Service settings. Build with [`Config::from_env`] or [`Config::from_vars`];
/// [`Config::default`] gives the values used when nothing is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on, from `HOST` (default `127.0.0.1`).
    pub host: IpAddr,
    /// Port to listen on, from `PORT` (default `8080`); 1 to 65535.
    pub port: u16,
    /// Log output format, from `LOG_FORMAT`, `json` or `pretty` (default `json`).
    pub log_format: LogFormat,
    /// Tracing filter directives, from `RUST_LOG` (default `info`); validated as an
    /// `EnvFilter` so a typo fails at startup instead of silencing logs.
    pub rust_log: String,
    /// Directory for local state, from `DATA_DIR` (default `./data`).
    pub data_dir: PathBuf,
    /// PostgreSQL for linked devices, from `DATABASE_URL` (may carry a
    /// password); `None`: linked devices stay in `data_dir` only.
    pub database_url: Option<Secret>,
    /// The CA that signs the database's certificate, from
    /// `DATABASE_CA_CERT`: PEM text, or the path of a PEM file.
    pub database_ca_cert: Option<String>,
    /// WhatsApp WebSocket endpoint override, from `WA_WS_URL`; a `ws://` or
    /// `wss://` URL. Unset means the library's default endpoint.
    pub wa_ws_url: Option<String>,
    /// WhatsApp Web client version override, from `WA_VERSION`; three
    /// dot-separated numbers such as `2.3000.1023456789`.
    pub wa_version: Option<String>,
    /// Whether to run against a sandbox, from `WA_SANDBOX` (default `false`); accepts
    /// `1/0/true/false/yes/no` in any case.
    pub wa_sandbox: bool,
    /// Where pairing state is kept, from `UPSTASH_REDIS_REST_URL` and
    /// `UPSTASH_REDIS_REST_TOKEN` (default: in memory).
    pub store: StoreConfig,
    /// Where outcomes are POSTed and how they are signed, from `WEBHOOK_URL`
    /// and `WEBHOOK_SECRET` (default: no webhook).
    pub webhook: Option<WebhookConfig>,
    /// Prefix for every store key, from `PAIR_KEY_PREFIX` (default `wa:pair:`).
    pub key_prefix: String,
    /// How long a stored pairing code lives, from `PAIR_CODE_TTL_SECS` (default `600`).
    pub code_ttl: Duration,
    /// How often a fresh code is requested, from `PAIR_REFRESH_SECS` (default `480`);
    /// always less than [`code_ttl`](Self::code_ttl).
    pub refresh_every: Duration,
    /// How long a request waits for the first code, from `PAIR_CODE_WAIT_SECS` (default `20`).
    pub code_wait: Duration,
    /// How often an idle event stream gets a keep-alive comment, from
    /// `SSE_KEEPALIVE_SECS` (default `15`).
    pub sse_keepalive: Duration,
    /// Whether `GET /` serves the pairing page, from `UI_ENABLED` (default `true`).
    pub ui_enabled: bool,
    /// Longest life of a pairing session, from `PAIR_SESSION_MAX_SECS` (default `1800`).
    pub session_max: Duration,
    /// How long linked, failed and expired outcomes are kept, from
    /// `PAIR_OUTCOME_TTL_SECS` (default `86400`).
    pub outcome_ttl: Duration,
    /// First retry delay, from `PAIR_BACKOFF_BASE_MS` (default `1000`); at most
    /// [`backoff_cap`](Self::backoff_cap).
    pub backoff_base: Duration,
    /// Longest retry delay, from `PAIR_BACKOFF_CAP_MS` (default `60000`).
    pub backoff_cap: Duration,
    /// Consecutive failures before a session is marked failed, from
    /// `PAIR_MAX_ATTEMPTS` (default `10`); at least 1.
    pub max_attempts: u32,
    /// How long shutdown waits for in-flight work, from `SHUTDOWN_GRACE_SECS` (default `10`).
    pub shutdown_grace: Duration,
    /// Supabase project URL, from `SUPABASE_URL`; an `http(s)://` URL. When
    /// set, the project's signed-in users are callers: their access tokens
    /// are verified against `${SUPABASE_URL}/auth/v1/.well-known/jwks.json`.
    pub supabase_url: Option<String>,
    /// Supabase service-role key, from `SUPABASE_SERVICE_ROLE_KEY`. A caller
    /// sending it is a server caller (edge functions have it as an
    /// environment variable).
    pub supabase_service_role_key: Option<Secret>,
    /// The project's legacy JWT secret, from `SUPABASE_JWT_SECRET`: verifies
    /// HS256 access tokens of projects not yet on asymmetric signing keys.
    /// Needs [`supabase_url`](Self::supabase_url).
    pub supabase_jwt_secret: Option<Secret>,
    /// Keys of server callers, from `API_KEYS` (comma-separated, each at
    /// least [`MIN_API_KEY_LEN`] characters; default: none). Sent as
    /// `Authorization: Bearer <key>`.
    pub api_keys: Vec<Secret>,
    /// Serve the API to anyone, from `ALLOW_UNAUTHENTICATED` (default
    /// `false`). Needed to listen on a non-loopback address with no
    /// [`api_keys`](Self::api_keys).
    pub allow_unauthenticated: bool,
    /// Browser origins allowed to call the API, from `CORS_ALLOWED_ORIGINS`
    /// (comma-separated exact origins such as `https://app.example.com`;
    /// default: none, so browsers on other origins are refused).
    pub cors_allowed_origins: Vec<String>,
    /// Most sessions one signed-in Supabase user may have open at once,
    /// from `PAIR_SESSIONS_PER_USER` (default `5`); at least 1. Server
    /// callers act for many users and are bounded by the service-wide cap.
    pub sessions_per_user: usize,
    /// Connected, unpaired WhatsApp clients kept ready so a new session only
    /// has to ask for its code, from `PAIR_WARM_CLIENTS` (default `2`; `0`
    /// turns the pool off; at most 16).
    pub warm_clients: usize,
    /// Longest time a client has to send a request's headers, from
    /// `HTTP_HEADER_TIMEOUT_SECS` (default `10`); then it is disconnected.
    pub header_timeout: Duration,
    /// Most HTTP connections open at once, from `HTTP_MAX_CONNECTIONS`
    /// (default `1024`); more wait to be accepted.
    pub max_connections: usize,
    /// `POST /pair` and refreshes per minute for each user or client IP,
    /// from `RATE_LIMIT_STARTS_PER_MIN` (default `10`); server callers get
    /// 20 times as many.
    pub starts_per_minute: u32,
    /// Other API requests per minute for each user or client IP, from
    /// `RATE_LIMIT_READS_PER_MIN` (default `120`); server callers get 20
    /// times as many.
    pub reads_per_minute: u32,
    /// Whether the last `X-Forwarded-For` entry is the client's address,
    /// from `TRUST_PROXY` (default `false`). Set it behind a proxy that
    /// appends it, such as Railway's.
    pub trust_proxy: bool,
    /// Codes per phone number and hour, automatic and manual together,
    /// from `PAIR_CODES_PER_HOUR` (default `6`); counted in the store, so a
    /// restart does not reset it. The hour opens with the first code.
    pub codes_per_hour: u32,
    /// How long the files of a device replaced by a re-link are kept, from
    /// `DEVICE_BACKUP_RETENTION_SECS` (default `604800`, 7 days); swept at
    /// startup and daily.
    pub backup_retention: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: DEFAULT_HOST,
            port: DEFAULT_PORT,
            log_format: DEFAULT_LOG_FORMAT,
            rust_log: DEFAULT_RUST_LOG.to_owned(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            database_url: None,
            database_ca_cert: None,
            wa_ws_url: None,
            wa_version: None,
            wa_sandbox: DEFAULT_WA_SANDBOX,
            store: StoreConfig::Memory,
            webhook: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            code_ttl: DEFAULT_CODE_TTL,
            refresh_every: DEFAULT_REFRESH_EVERY,
            code_wait: DEFAULT_CODE_WAIT,
            sse_keepalive: DEFAULT_SSE_KEEPALIVE,
            ui_enabled: DEFAULT_UI_ENABLED,
            session_max: DEFAULT_SESSION_MAX,
            outcome_ttl: DEFAULT_OUTCOME_TTL,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            supabase_url: None,
            supabase_service_role_key: None,
            supabase_jwt_secret: None,
            api_keys: Vec::new(),
            allow_unauthenticated: DEFAULT_ALLOW_UNAUTHENTICATED,
            cors_allowed_origins: Vec::new(),
            sessions_per_user: DEFAULT_SESSIONS_PER_USER,
            warm_clients: DEFAULT_WARM_CLIENTS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            starts_per_minute: DEFAULT_STARTS_PER_MINUTE,
            reads_per_minute: DEFAULT_READS_PER_MINUTE,
            trust_proxy: false,
            codes_per_hour: DEFAULT_CODES_PER_HOUR,
            backup_retention: DEFAULT_BACKUP_RETENTION,
        }
    }
}

impl Config {
    /// Reads the settings from the process environment, after loading a
    /// `.env` file from the working directory or a parent if one exists
    /// (variables already set in the environment win over the file).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the offending variable, including when a
    /// value is not valid UTF-8 or the `.env` file exists but is malformed.
    pub fn from_env() -> Result<Self, ConfigError> {
        load_dotenv()?;
        let mut vars = Vec::with_capacity(SETTINGS.len());
        for name in SETTINGS.iter().map(|setting| setting.name) {
            // `std::env::var` rather than `vars()`: the latter panics on a
            // non-UTF-8 value anywhere in the environment.
            match std::env::var(name) {
                Ok(value) => vars.push((name, value)),
                Err(VarError::NotPresent) => {}
                Err(VarError::NotUnicode(_)) => return Err(ConfigError::NotUnicode { var: name }),
            }
        }
        Self::from_vars(vars)
    }

    /// Builds the settings from name/value pairs instead of the process
    /// environment; unknown names are ignored and a later pair overrides an
    /// earlier one with the same name.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first offending variable.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = Vars(
            vars.into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        );

        let config = Self {
            host: vars.parse(
                HOST,
                DEFAULT_HOST,
                "an IP address such as 127.0.0.1 or 0.0.0.0",
                |v| v.parse().ok(),
            )?,
            port: vars.parse(PORT, DEFAULT_PORT, "a port number (1-65535)", |v| {
                parse_unsigned::<u16>(v).filter(|&port| port != 0)
            })?,
            log_format: vars.parse(
                LOG_FORMAT,
                DEFAULT_LOG_FORMAT,
                "json or pretty",
                LogFormat::parse,
            )?,
            rust_log: vars.parse(
                RUST_LOG,
                DEFAULT_RUST_LOG.to_owned(),
                "a tracing filter such as info or wa_pair=debug,info",
                |v| {
                    tracing_subscriber::EnvFilter::builder()
                        .parse(v)
                        .ok()
                        .map(|_| v.to_owned())
                },
            )?,
            data_dir: vars
                .get(DATA_DIR)
                .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from),
            database_url: vars
                .parse_optional_secret(
                    DATABASE_URL,
                    "a postgres:// URL, e.g. postgres://postgres:password@db.example.supabase.co:5432/postgres",
                    |v| url_with_scheme(v, &["postgres", "postgresql"]),
                )?
                .map(Secret::new),
            database_ca_cert: vars.get(DATABASE_CA_CERT).map(str::to_owned),
            wa_ws_url: vars.parse_optional(
                WA_WS_URL,
                "a ws:// or wss:// URL, e.g. wss://web.whatsapp.com/ws/chat",
                |v| url_with_scheme(v, &["ws", "wss"]),
            )?,
            wa_version: vars.parse_optional(
                WA_VERSION,
                "three dot-separated numbers, e.g. 2.3000.1023456789",
                parse_wa_version,
            )?,
            wa_sandbox: vars.parse(
                WA_SANDBOX,
                DEFAULT_WA_SANDBOX,
                "one of 1, 0, true, false, yes, no",
                parse_bool,
            )?,
            store: store_config(&vars)?,
            webhook: webhook_config(&vars)?,
            key_prefix: vars
                .get(KEY_PREFIX)
                .map_or_else(|| DEFAULT_KEY_PREFIX.to_owned(), str::to_owned),
            code_ttl: vars.parse(CODE_TTL, DEFAULT_CODE_TTL, SECONDS, parse_secs)?,
            refresh_every: vars.parse(REFRESH, DEFAULT_REFRESH_EVERY, SECONDS, parse_secs)?,
            code_wait: vars.parse(CODE_WAIT, DEFAULT_CODE_WAIT, SECONDS, parse_secs)?,
            sse_keepalive: vars.parse(
                SSE_KEEPALIVE,
                DEFAULT_SSE_KEEPALIVE,
                "a whole number of seconds from 1 to 300",
                |v| parse_secs(v).filter(|d| *d <= MAX_SSE_KEEPALIVE),
            )?,
            ui_enabled: vars.parse(
                UI_ENABLED,
                DEFAULT_UI_ENABLED,
                "one of 1, 0, true, false, yes, no",
                parse_bool,
            )?,
            session_max: vars.parse(SESSION_MAX, DEFAULT_SESSION_MAX, SECONDS, parse_secs)?,
            outcome_ttl: vars.parse(OUTCOME_TTL, DEFAULT_OUTCOME_TTL, SECONDS, parse_secs)?,
            backoff_base: vars.parse(
                BACKOFF_BASE,
                DEFAULT_BACKOFF_BASE,
                MILLISECONDS,
                parse_millis,
            )?,
            backoff_cap: vars.parse(
                BACKOFF_CAP,
                DEFAULT_BACKOFF_CAP,
                MILLISECONDS,
                parse_millis,
            )?,
            max_attempts: vars.parse(
                MAX_ATTEMPTS,
                DEFAULT_MAX_ATTEMPTS,
                "a whole number from 1 to 4294967295",
                |v| parse_unsigned::<u32>(v).filter(|&n| n > 0),
            )?,
            shutdown_grace: vars.parse(
                SHUTDOWN_GRACE,
                DEFAULT_SHUTDOWN_GRACE,
                SECONDS,
                parse_secs,
            )?,
            supabase_url: vars.parse_optional(
                SUPABASE_URL,
                "an http:// or https:// URL, e.g. https://project.supabase.co",
                |v| url_with_scheme(v, &["http", "https"]),
            )?,
            supabase_service_role_key: vars.get(SUPABASE_KEY).map(Secret::new),
            supabase_jwt_secret: vars.get(SUPABASE_JWT_SECRET).map(Secret::new),
            api_keys: api_keys(&vars)?,
            allow_unauthenticated: vars.parse(
                ALLOW_UNAUTHENTICATED,
                DEFAULT_ALLOW_UNAUTHENTICATED,
                "one of 1, 0, true, false, yes, no",
                parse_bool,
            )?,
            cors_allowed_origins: vars.parse(
                CORS_ALLOWED_ORIGINS,
                Vec::new(),
                "comma-separated origins such as https://app.example.com (scheme, host and \
                 optional port; no path, no *)",
                parse_origins,
            )?,
            sessions_per_user: vars.parse(
                SESSIONS_PER_USER,
                DEFAULT_SESSIONS_PER_USER,
                "a whole number from 1 to 1000",
                |v| parse_unsigned::<usize>(v).filter(|n| (1..=1000).contains(n)),
            )?,
            warm_clients: vars.parse(
                WARM_CLIENTS,
                DEFAULT_WARM_CLIENTS,
                "a whole number from 0 to 16",
                |v| parse_unsigned::<usize>(v).filter(|n| *n <= 16),
            )?,
            header_timeout: vars.parse(
                HEADER_TIMEOUT,
                DEFAULT_HEADER_TIMEOUT,
                SECONDS,
                parse_secs,
            )?,
            max_connections: vars.parse(
                MAX_CONNECTIONS,
                DEFAULT_MAX_CONNECTIONS,
                "a whole number from 1 to 65535",
                |v| parse_unsigned::<usize>(v).filter(|n| (1..=65_535).contains(n)),
            )?,
            starts_per_minute: vars.parse(
                STARTS_PER_MINUTE,
                DEFAULT_STARTS_PER_MINUTE,
                "a whole number from 1 to 1000000",
                |v| parse_unsigned::<u32>(v).filter(|n| (1..=1_000_000).contains(n)),
            )?,
            reads_per_minute: vars.parse(
                READS_PER_MINUTE,
                DEFAULT_READS_PER_MINUTE,
                "a whole number from 1 to 1000000",
                |v| parse_unsigned::<u32>(v).filter(|n| (1..=1_000_000).contains(n)),
            )?,
            trust_proxy: vars.parse(
                TRUST_PROXY,
                false,
                "one of 1, 0, true, false, yes, no",
                parse_bool,
            )?,
            codes_per_hour: vars.parse(
                CODES_PER_HOUR,
                DEFAULT_CODES_PER_HOUR,
                "a whole number from 1 to 1000",
                |v| parse_unsigned::<u32>(v).filter(|n| (1..=1000).contains(n)),
            )?,
            backup_retention: vars.parse(
                BACKUP_RETENTION,
                DEFAULT_BACKUP_RETENTION,
                SECONDS,
                parse_secs,
            )?,
        };
        config.check_consistency()?;
        Ok(config)
    }

    /// The socket address to bind: [`host`](Self::host) and [`port`](Self::port).
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// [`wa_version`](Self::wa_version) as `(major, minor, patch)`.
    #[must_use]
    pub fn wa_version_parts(&self) -> Option<(u32, u32, u32)> {
        let version = self.wa_version.as_deref()?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    }

    /// Whether any caller is configured: API keys, the service-role key or
    /// a Supabase project whose users may call.
    #[must_use]
    pub fn has_callers(&self) -> bool {
        !self.api_keys.is_empty()
            || self.supabase_service_role_key.is_some()
            || self.supabase_url.is_some()
    }

    fn check_consistency(&self) -> Result<(), ConfigError> {
        if self.refresh_every >= self.code_ttl {
            return Err(ConfigError::Conflict {
                var: REFRESH,
                message: format!(
                    "{REFRESH} ({}) must be less than {CODE_TTL} ({}), otherwise the stored code \
                     could expire before its replacement is fetched",
                    self.refresh_every.as_secs(),
                    self.code_ttl.as_secs()
                ),
            });
        }
        if self.supabase_jwt_secret.is_some() && self.supabase_url.is_none() {
            return Err(ConfigError::Conflict {
                var: SUPABASE_JWT_SECRET,
                message: format!(
                    "{SUPABASE_JWT_SECRET} is set but {SUPABASE_URL} is not: tokens are only \
                     accepted from a known project, so set {SUPABASE_URL} too"
                ),
            });
        }
        if !self.host.is_loopback() && !self.has_callers() && !self.allow_unauthenticated {
            return Err(ConfigError::Conflict {
                var: API_KEYS,
                message: format!(
                    "{HOST} is {}, reachable from other machines, and no caller is configured: \
                     set {API_KEYS} (comma-separated keys of at least {MIN_API_KEY_LEN} \
                     characters, e.g. from `openssl rand -hex 32`) for server callers and/or \
                     {SUPABASE_URL} for signed-in Supabase users, so only your callers can \
                     make WhatsApp notify phones, or set {ALLOW_UNAUTHENTICATED}=true to serve \
                     anyone on purpose",
                    self.host
                ),
            });
        }
        if self.backoff_base > self.backoff_cap {
            return Err(ConfigError::Conflict {
                var: BACKOFF_BASE,
                message: format!(
                    "{BACKOFF_BASE} ({}) must be at most {BACKOFF_CAP} ({}), since the cap bounds every retry delay",
                    self.backoff_base.as_millis(),
                    self.backoff_cap.as_millis()
                ),
            });
        }
        Ok(())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable multi-line output, for local development.
    Pretty,
}

impl LogFormat {
    /// Parses `json` or `pretty`, ignoring case.
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        if value.eq_ignore_ascii_case("json") {
            Some(Self::Json)
        } else if value.eq_ignore_ascii_case("pretty") {
            Some(Self::Pretty)
        } else {
            None
        }
    }
}

/// Where pairing state is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In-process memory: state is lost on restart. Used when neither
    /// Upstash variable is set.
    Memory,
    /// Upstash Redis over its REST API.
    Upstash {
        /// REST endpoint, an `http(s)://` URL, from `UPSTASH_REDIS_REST_URL`.
        url: String,
        /// REST token, from `UPSTASH_REDIS_REST_TOKEN`.
        token: Secret,
    },
    /// A Redis server, natively.
    Redis {
        /// `redis://` or `rediss://` URL, from `REDIS_URL` (may carry a
        /// password).
        url: Secret,
    },
}

/// A credential: `Debug` and `Display` print `[redacted]`, so it cannot leak
/// through a derived `Debug` or a log line. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A setting that could not be read. The message always names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value does not have the expected format.
    #[error("{var} must be {expected}, got {got:?}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// The expected format, in words.
        expected: &'static str,
        /// The rejected value.
        got: String,
    },
    /// One of a pair of variables that only work together is missing.
    #[error("{var} must be set when {companion} is set: set both, or neither")]
    Missing {
        /// The missing variable.
        var: &'static str,
        /// The variable that was set and needs it.
        companion: &'static str,
    },
    /// Two values are individually valid but contradict each other.
    #[error("{message}")]
    Conflict {
        /// The variable to change.
        var: &'static str,
        /// What is wrong and why, naming both variables.
        message: String,
    },
    /// A value is not valid UTF-8.
    #[error("{var} must be valid UTF-8 text")]
    NotUnicode {
        /// The variable's name.
        var: &'static str,
    },
    /// A `.env` file exists but could not be read or parsed.
    #[error(".env file could not be loaded: {reason}")]
    DotEnv {
        /// What went wrong, without the file's contents.
        reason: String,
    },
}

impl ConfigError {
    /// The variable the error is about, if it is about one.
    #[must_use]
    pub fn var(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { var, .. }
            | Self::Missing { var, .. }
            | Self::Conflict { var, .. }
            | Self::NotUnicode { var } => Some(var),
            Self::DotEnv { .. } => None,
        }
    }
}

struct Vars(HashMap<String, String>);

impl Vars {
    /// The value of `name`, treating an empty value as unset.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn parse<T>(
        &self,
        name: &'static str,
        default: T,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        Ok(self
            .parse_optional(name, expected, parse)?
            .unwrap_or(default))
    }

    fn parse_optional<T>(
        &self,
        name: &'static str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        parse(value).map(Some).ok_or_else(|| ConfigError::Invalid {
            var: name,
            expected,
            got: value.to_owned(),
        })
    }

    /// [`parse_optional`](Self::parse_optional) for a secret: an invalid
    /// value is not repeated in the error (it may hold a password).
    fn parse_optional_secret<T>(
        &self,
        name: &'static str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        self.parse_optional(name, expected, parse)
            .map_err(|error| match error {
                ConfigError::Invalid { var, expected, .. } => ConfigError::Invalid {
                    var,
                    expected,
                    got: "[redacted]".to_owned(),
                },
                other => other,
            })
    }
}

/// `API_KEYS`: comma-separated, blanks around keys ignored. A key too short
/// to resist guessing is refused; the error says which one, never its value.
fn api_keys(vars: &Vars) -> Result<Vec<Secret>, ConfigError> {
    let Some(list) = vars.get(API_KEYS) else {
        return Ok(Vec::new());
    };
    let keys: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    for (n, key) in keys.iter().enumerate() {
        let chars = key.chars().count();
        if chars < MIN_API_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::Conflict {
                var: API_KEYS,
                message: format!(
                    "{API_KEYS}: key {} of {} has {chars} characters or contains blanks; each \
                     key must be at least {MIN_API_KEY_LEN} printable characters without \
                     blanks (e.g. from `openssl rand -hex 32`)",
                    n + 1,
                    keys.len()
                ),
            });
        }
    }
    Ok(keys.into_iter().map(Secret::new).collect())
}

/// Where outcomes are POSTed, and the secret that signs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `WEBHOOK_URL`.
    pub url: String,
    /// `WEBHOOK_SECRET`: `whsec_` + base64, or 32+ characters.
    pub secret: Secret,
}

/// Shortest `WEBHOOK_SECRET` taken as plain text: 256 bits of key.
pub const MIN_WEBHOOK_SECRET_LEN: usize = 32;

fn webhook_config(vars: &Vars) -> Result<Option<WebhookConfig>, ConfigError> {
    let url = vars.parse_optional(
        WEBHOOK_URL,
        "an http:// or https:// URL, e.g. https://example.supabase.co/functions/v1/wa-pair-webhook",
        |v| url_with_scheme(v, &["http", "https"]),
    )?;
    let secret = vars.parse_optional(
        WEBHOOK_SECRET,
        "whsec_ followed by base64, or at least 32 characters",
        |v| webhook_key(v).map(|_| v.to_owned()),
    )?;
    match (url, secret) {
        (Some(url), Some(secret)) => Ok(Some(WebhookConfig {
            url,
            secret: Secret::new(secret),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Missing {
            var: WEBHOOK_SECRET,
            companion: WEBHOOK_URL,
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            var: WEBHOOK_URL,
            companion: WEBHOOK_SECRET,
        }),
    }
}

/// The HMAC key of a webhook secret: the base64 after `whsec_`, else the
/// text itself when it is long enough.
pub fn webhook_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .filter(|key| !key.is_empty()),
        None => {
            (secret.chars().count() >= MIN_WEBHOOK_SECRET_LEN).then(|| secret.as_bytes().to_vec())
        }
    }
}

fn store_config(vars: &Vars) -> Result<StoreConfig, ConfigError> {
    let redis = vars.parse_optional_secret(
        REDIS_URL,
        "a redis:// or rediss:// URL, e.g. redis://default:password@redis.railway.internal:6379",
        |v| url_with_scheme(v, &["redis", "rediss"]),
    )?;
    if let Some(url) = redis {
        if vars.get(UPSTASH_URL).is_some() || vars.get(UPSTASH_TOKEN).is_some() {
            return Err(ConfigError::Conflict {
                var: REDIS_URL,
                message: "REDIS_URL and UPSTASH_REDIS_REST_URL/TOKEN are both set; set one \
                          store: REDIS_URL for a Redis server, the Upstash pair for its REST API"
                    .to_owned(),
            });
        }
        return Ok(StoreConfig::Redis {
            url: Secret::new(url),
        });
    }
    let url = vars.parse_optional(
        UPSTASH_URL,
        "an http:// or https:// URL, e.g. https://example.upstash.io",
        |v| url_with_scheme(v, &["http", "https"]),
    )?;
    match (url, vars.get(UPSTASH_TOKEN)) {
        (Some(url), Some(token)) => Ok(StoreConfig::Upstash {
            url,
            token: Secret::new(token),
        }),
        (None, None) => Ok(StoreConfig::Memory),
        (Some(_), None) => Err(ConfigError::Missing {
            var: UPSTASH_TOKEN,
            companion: UPSTASH_URL,
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            var: UPSTASH_URL,
            companion: UPSTASH_TOKEN,
        }),
    }
}

/// Parses ASCII digits only; `str::parse` alone would also accept a leading `+`.
fn parse_unsigned<T: std::str::FromStr>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_secs(value: &str) -> Option<Duration> {
    parse_unsigned::<u64>(value)
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs)
        .filter(|d| *d <= MAX_DURATION)
}

fn parse_millis(value: &str) -> Option<Duration> {
    parse_unsigned::<u64>(value)
        .filter(|&millis| millis > 0)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
}

fn parse_bool(value: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["1", "true", "yes"];
    const FALSE: [&str; 3] = ["0", "false", "no"];
    if TRUE.iter().any(|t| value.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| value.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

/// Checks `major.minor.patch` with each part fitting a `u32`, which is how
/// WhatsApp clients carry the version.
fn parse_wa_version(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.split('.').collect();
    let well_formed = parts.len() == 3 && parts.iter().all(|p| parse_unsigned::<u32>(p).is_some());
    well_formed.then(|| value.to_owned())
}

/// Returns the value unchanged if it is an absolute URL with a host and one
/// of `schemes`; the original text is kept because `url` would normalise it
/// (for example by adding a trailing `/`).
/// Exact browser origins: `scheme://host[:port]`, nothing after it. `*` is
/// refused: the API's callers are known pages, not the whole web.
fn parse_origins(value: &str) -> Option<Vec<String>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let parsed = url::Url::parse(origin).ok()?;
            let exact = matches!(parsed.scheme(), "http" | "https")
                && parsed.host_str().is_some()
                && parsed.path() == "/"
                && !origin.ends_with('/')
                && parsed.query().is_none()
                && parsed.username().is_empty();
            exact.then(|| parsed.origin().ascii_serialization())
        })
        .collect()
}

fn url_with_scheme(value: &str, schemes: &[&str]) -> Option<String> {
    let parsed = url::Url::parse(value).ok()?;
    let acceptable =
        schemes.contains(&parsed.scheme()) && parsed.host_str().is_some_and(|h| !h.is_empty());
    acceptable.then(|| value.to_owned())
}

fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(error) if error.not_found() => Ok(()),
        // dotenvy's own message quotes the whole offending line, which may
        // hold a secret, so only the variable name and position are kept.
        Err(dotenvy::Error::LineParse(line, index)) => Err(ConfigError::DotEnv {
            reason: format!(
                "a line could not be parsed (variable {:?}, at character {index})",
                line.split('=').next().unwrap_or_default().trim()
            ),
        }),
        Err(error) => Err(ConfigError::DotEnv {
            reason: error.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().copied())
    }

    fn error(vars: &[(&str, &str)]) -> ConfigError {
        match config(vars) {
            Ok(config) => panic!("expected {vars:?} to be rejected, got {config:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn empty_environment_gives_the_documented_defaults() {
        // Arrange
        let vars: [(&str, &str); 0] = [];

        // Act
        let config = Config::from_vars(vars).expect("defaults are valid");

        // Assert
        assert_eq!(config, Config::default());
        assert_eq!(
            config.listen_addr(),
            "127.0.0.1:8080".parse().expect("addr")
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.rust_log, DEFAULT_RUST_LOG);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.store, StoreConfig::Memory);
        assert_eq!(config.key_prefix, "wa:pair:");
        assert_eq!(config.code_ttl, Duration::from_secs(600));
        assert_eq!(config.refresh_every, Duration::from_secs(480));
        assert_eq!(config.code_wait, Duration::from_secs(20));
        assert_eq!(config.session_max, Duration::from_secs(1800));
        assert_eq!(config.outcome_ttl, Duration::from_secs(86_400));
        assert_eq!(config.backoff_base, Duration::from_millis(1000));
        assert_eq!(config.backoff_cap, Duration::from_millis(60_000));
        assert_eq!(config.max_attempts, 10);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert!(!config.wa_sandbox);
        assert_eq!(config.wa_ws_url, None);
        assert_eq!(config.wa_version, None);
        assert_eq!(config.supabase_url, None);
        assert_eq!(config.supabase_service_role_key, None);
        assert!(config.api_keys.is_empty());
        assert!(!config.allow_unauthenticated);
    }

    #[test]
    fn the_readme_table_is_the_settings_table() {
        // Arrange
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|line| line.starts_with("| `") && line.contains("` | "))
            .filter(|line| {
                let name = line
                    .trim_start_matches("| `")
                    .split('`')
                    .next()
                    .unwrap_or("");
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();

        // Assert
        for setting in SETTINGS {
            let row = setting.readme_row();
            assert!(
                rows.contains(&row.as_str()),
                "the README's row for {} differs from config/settings.rs; expected:\n{row}",
                setting.name
            );
        }
        assert_eq!(rows.len(), SETTINGS.len(), "a README row names no setting");
    }

    #[test]
    fn env_example_lists_every_setting_with_its_default_and_nothing_else() {
        // Arrange
        let example = include_str!("../../.env.example");
        let assignments: Vec<(&str, &str)> = example
            .lines()
            .map(|line| line.trim_start_matches("# "))
            .filter_map(|line| line.split_once('='))
            .filter(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();

        // Assert
        for setting in SETTINGS {
            let expected = match setting.default {
                SettingDefault::Value(value) => value,
                SettingDefault::Unset(_) => "",
            };
            assert!(
                assignments.contains(&(setting.name, expected)),
                ".env.example lacks {}={expected}",
                setting.name
            );
        }
        for (name, _) in &assignments {
            assert!(
                SETTINGS.iter().any(|setting| setting.name == *name),
                ".env.example sets {name}, which is no setting"
            );
        }
    }

    #[test]
    fn each_written_default_is_the_default_the_service_uses() {
        let unset = config(&[]).expect("defaults are valid");
        for setting in SETTINGS {
            if let SettingDefault::Value(value) = setting.default {
                let written = config(&[(setting.name, value)])
                    .unwrap_or_else(|e| panic!("{}={value} is refused: {e}", setting.name));
                assert_eq!(
                    written, unset,
                    "{}={value} is not the default",
                    setting.name
                );
            }
        }
    }

    #[test]
    fn a_public_address_without_callers_is_refused_naming_what_to_set() {
        let refused = config(&[(HOST, "0.0.0.0")]).unwrap_err();

        let message = refused.to_string();
        assert_eq!(refused.var(), Some(API_KEYS));
        assert!(message.contains("API_KEYS"), "{message}");
        assert!(message.contains("SUPABASE_URL"), "{message}");
        assert!(message.contains("ALLOW_UNAUTHENTICATED=true"), "{message}");
    }

    #[test]
    fn a_public_address_is_served_to_supabase_users_or_the_service_role() {
        let users = config(&[(HOST, "0.0.0.0"), (SUPABASE_URL, "https://p.supabase.co")]);
        let service = config(&[(HOST, "0.0.0.0"), (SUPABASE_KEY, "sb_secret_x")]);

        assert!(users.is_ok(), "{users:?}");
        assert!(service.is_ok(), "{service:?}");
    }

    #[test]
    fn a_jwt_secret_without_its_project_is_refused() {
        let refused = config(&[(SUPABASE_JWT_SECRET, "secret")]).unwrap_err();

        assert_eq!(refused.var(), Some(SUPABASE_JWT_SECRET));
        assert!(refused.to_string().contains("SUPABASE_URL"), "{refused}");
    }

    #[test]
    fn a_public_address_is_served_with_keys_or_when_explicitly_open() {
        let key = "0123456789abcdef0123456789abcdef";

        let with_keys = config(&[(HOST, "0.0.0.0"), (API_KEYS, key)]);
        let open = config(&[(HOST, "0.0.0.0"), (ALLOW_UNAUTHENTICATED, "true")]);
        let loopback = config(&[(HOST, "127.0.0.1")]);

        assert!(with_keys.is_ok(), "{with_keys:?}");
        assert!(open.is_ok(), "{open:?}");
        assert!(loopback.is_ok(), "{loopback:?}");
    }

    #[test]
    fn cors_origins_must_be_exact() {
        for bad in [
            "*",
            "https://app.example.com/",
            "https://app.example.com/page",
            "app.example.com",
            "ftp://x.example",
        ] {
            let refused = config(&[(CORS_ALLOWED_ORIGINS, bad)]);

            assert_eq!(
                refused.err().and_then(|e| e.var()),
                Some(CORS_ALLOWED_ORIGINS),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_short_api_key_is_refused_without_printing_it() {
        let short = "short-key-SECRET";

        let refused = config(&[(
            API_KEYS,
            &format!("0123456789abcdef0123456789abcdef,{short}"),
        )])
        .unwrap_err();

        let message = refused.to_string();
        assert!(message.contains("key 2 of 2"), "{message}");
        assert!(!message.contains("SECRET"), "{message}");
    }

    #[test]
    fn every_variable_is_read_and_parsed() {
        // Arrange
        let vars = [
            (HOST, "0.0.0.0"),
            (PORT, "3000"),
            (LOG_FORMAT, "Pretty"),
            (RUST_LOG, "wa_pair=debug,info"),
            (DATA_DIR, "/var/lib/wa-pair"),
            (
                DATABASE_URL,
                "postgres://postgres:pw@db.example.test:5432/postgres",
            ),
            (DATABASE_CA_CERT, "/etc/ssl/supabase-ca.crt"),
            (WA_WS_URL, "wss://example.test/ws/chat"),
            (WA_VERSION, "2.3000.1023456789"),
            (WA_SANDBOX, "YES"),
            (UPSTASH_URL, "https://eu1-example.upstash.io"),
            (UPSTASH_TOKEN, "upstash-token"),
            (WEBHOOK_URL, "https://hooks.example.test/wa"),
            (WEBHOOK_SECRET, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            (KEY_PREFIX, "test:pair:"),
            (CODE_TTL, "300"),
            (REFRESH, "240"),
            (CODE_WAIT, "5"),
            (SSE_KEEPALIVE, "7"),
            (UI_ENABLED, "no"),
            (SESSION_MAX, "900"),
            (OUTCOME_TTL, "3600"),
            (BACKOFF_BASE, "250"),
            (BACKOFF_CAP, "5000"),
            (MAX_ATTEMPTS, "3"),
            (SHUTDOWN_GRACE, "2"),
            (SUPABASE_URL, "https://project.supabase.co"),
            (SUPABASE_KEY, "service-role-key"),
            (SUPABASE_JWT_SECRET, "jwt-secret"),
            (
                API_KEYS,
                " 0123456789abcdef0123456789abcdef , fedcba9876543210fedcba9876543210",
            ),
            (ALLOW_UNAUTHENTICATED, "false"),
            (
                CORS_ALLOWED_ORIGINS,
                "https://app.example.com, http://localhost:5173",
            ),
            (SESSIONS_PER_USER, "2"),
            (WARM_CLIENTS, "3"),
            (HEADER_TIMEOUT, "3"),
            (MAX_CONNECTIONS, "64"),
            (STARTS_PER_MINUTE, "5"),
            (READS_PER_MINUTE, "50"),
            (TRUST_PROXY, "yes"),
            (CODES_PER_HOUR, "4"),
            (BACKUP_RETENTION, "86400"),
        ];

        // Act
        let config = config(&vars).expect("valid");

        // Assert: every setting but REDIS_URL, which excludes the Upstash
        // pair (`redis_url_selects_a_redis_server_and_excludes_upstash`).
        assert_eq!(
            vars.len(),
            SETTINGS.iter().filter(|s| s.name != REDIS_URL).count()
        );
        let expected = Config {
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 3000,
            log_format: LogFormat::Pretty,
            rust_log: "wa_pair=debug,info".to_owned(),
            data_dir: PathBuf::from("/var/lib/wa-pair"),
            database_url: Some(Secret::new(
                "postgres://postgres:pw@db.example.test:5432/postgres".to_owned(),
            )),
            database_ca_cert: Some("/etc/ssl/supabase-ca.crt".to_owned()),
            wa_ws_url: Some("wss://example.test/ws/chat".to_owned()),
            wa_version: Some("2.3000.1023456789".to_owned()),
            wa_sandbox: true,
            store: StoreConfig::Upstash {
                url: "https://eu1-example.upstash.io".to_owned(),
                token: Secret::new("upstash-token"),
            },
            webhook: Some(WebhookConfig {
                url: "https://hooks.example.test/wa".to_owned(),
                secret: Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            }),
            key_prefix: "test:pair:".to_owned(),
            code_ttl: Duration::from_secs(300),
            refresh_every: Duration::from_secs(240),
            code_wait: Duration::from_secs(5),
            sse_keepalive: Duration::from_secs(7),
            ui_enabled: false,
            session_max: Duration::from_secs(900),
            outcome_ttl: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_millis(5000),
            max_attempts: 3,
            shutdown_grace: Duration::from_secs(2),
            supabase_url: Some("https://project.supabase.co".to_owned()),
            supabase_service_role_key: Some(Secret::new("service-role-key")),
            supabase_jwt_secret: Some(Secret::new("jwt-secret")),
            api_keys: vec![
                Secret::new("0123456789abcdef0123456789abcdef"),
                Secret::new("fedcba9876543210fedcba9876543210"),
            ],
            allow_unauthenticated: false,
            cors_allowed_origins: vec![
                "https://app.example.com".to_owned(),
                "http://localhost:5173".to_owned(),
            ],
            sessions_per_user: 2,
            warm_clients: 3,
            header_timeout: Duration::from_secs(3),
            max_connections: 64,
            starts_per_minute: 5,
            reads_per_minute: 50,
            trust_proxy: true,
            codes_per_hour: 4,
            backup_retention: Duration::from_secs(86_400),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn empty_values_count_as_unset() {
        // Arrange
        let vars = [
            (PORT, ""),
            (LOG_FORMAT, ""),
            (UPSTASH_URL, ""),
            (UPSTASH_TOKEN, ""),
        ];

        // Act
        let config = config(&vars).expect("valid");

        // Assert
        assert_eq!(config, Config::default());
    }

    #[test]
    fn from_vars_accepts_a_map_of_owned_strings() {
        // Arrange
        let vars: HashMap<String, String> = [(PORT.to_owned(), "9090".to_owned())].into();

        // Act
        let config = Config::from_vars(vars).expect("valid");

        // Assert
        assert_eq!(config.port, 9090);
    }

    #[test]
    fn unknown_variables_are_ignored() {
        // Arrange
        let vars = [("PATH", "/usr/bin"), ("port", "not-the-port")];

        // Act
        let config = config(&vars).expect("valid");

        // Assert
        assert_eq!(config, Config::default());
    }

    #[test]
    fn invalid_port_names_the_variable_and_format() {
        // Arrange
        let vars = [(PORT, "abc")];

        // Act
        let error = error(&vars);

        // Assert
        assert_eq!(
            error.to_string(),
            "PORT must be a port number (1-65535), got \"abc\""
        );
        assert_eq!(error.var(), Some("PORT"));
    }

    #[test]
    fn each_invalid_value_names_its_variable() {
        // Arrange
        let cases = [
            (HOST, "localhost"),
            (PORT, "0"),
            (PORT, "65536"),
            (PORT, "+8080"),
            (PORT, " 8080"),
            (LOG_FORMAT, "xml"),
            (RUST_LOG, "info,=,[unclosed"),
            (WA_WS_URL, "https://web.whatsapp.com/ws/chat"),
            (WA_WS_URL, "wss://"),
            (WA_VERSION, "2.3000"),
            (WA_VERSION, "2.3000.x"),
            (WA_VERSION, "2.3000.99999999999"),
            (WA_VERSION, "2.-1.3"),
            (WA_SANDBOX, "maybe"),
            (CODE_TTL, "0"),
            (CODE_TTL, "10m"),
            (CODE_TTL, "31536001"),
            (REFRESH, "-5"),
            (CODE_WAIT, "1.5"),
            (SESSION_MAX, "0"),
            (OUTCOME_TTL, "18446744073709551616"),
            (BACKOFF_BASE, "0"),
            (BACKOFF_CAP, "never"),
            (MAX_ATTEMPTS, "0"),
            (SHUTDOWN_GRACE, "0"),
            (SUPABASE_URL, "project.supabase.co"),
        ];

        for (var, value) in cases {
            // Act
            let error = error(&[(var, value)]);

            // Assert
            let message = error.to_string();
            assert_eq!(error.var(), Some(var), "{message}");
            assert!(message.starts_with(&format!("{var} must be ")), "{message}");
            assert!(message.ends_with(&format!("got {value:?}")), "{message}");
        }
    }

    #[test]
    fn upstash_needs_both_url_and_token() {
        // Arrange
        let url_only = [(UPSTASH_URL, "https://example.upstash.io")];
        let token_only = [(UPSTASH_TOKEN, "token")];

        // Act
        let url_only_error = error(&url_only);
        let token_only_error = error(&token_only);

        // Assert
        assert_eq!(url_only_error.var(), Some(UPSTASH_TOKEN));
        assert!(
            url_only_error
                .to_string()
                .starts_with("UPSTASH_REDIS_REST_TOKEN must be set")
        );
        assert_eq!(token_only_error.var(), Some(UPSTASH_URL));
        assert!(
            token_only_error
                .to_string()
                .starts_with("UPSTASH_REDIS_REST_URL must be set")
        );
    }

    #[test]
    fn upstash_url_must_be_http_or_https() {
        // Arrange
        let vars = [
            (UPSTASH_URL, "redis://example.upstash.io:6379"),
            (UPSTASH_TOKEN, "token"),
        ];

        // Act
        let error = error(&vars);

        // Assert
        assert_eq!(error.var(), Some(UPSTASH_URL));
        assert!(error.to_string().contains("an http:// or https:// URL"));
    }

    #[test]
    fn upstash_pair_selects_the_upstash_store_keeping_the_url_as_written() {
        // Arrange
        let vars = [
            (UPSTASH_URL, "https://example.upstash.io"),
            (UPSTASH_TOKEN, "t0ken"),
        ];

        // Act
        let config = config(&vars).expect("valid");

        // Assert
        match config.store {
            StoreConfig::Upstash { url, token } => {
                assert_eq!(url, "https://example.upstash.io");
                assert_eq!(token.expose(), "t0ken");
            }
            other => panic!("expected the Upstash store, got {other:?}"),
        }
    }

    #[test]
    fn redis_url_selects_a_redis_server_and_excludes_upstash() {
        // Arrange
        let redis = [(REDIS_URL, "rediss://default:pw@redis.example.test:6380")];
        let both = [
            (REDIS_URL, "redis://127.0.0.1:6379"),
            (UPSTASH_URL, "https://example.upstash.io"),
            (UPSTASH_TOKEN, "t0ken"),
        ];
        let not_redis = [(REDIS_URL, "https://example.upstash.io")];

        // Act
        let chosen = config(&redis).expect("valid").store;
        let conflict = config(&both).unwrap_err();
        let refused = config(&not_redis).unwrap_err();

        // Assert
        match chosen {
            StoreConfig::Redis { url } => {
                assert_eq!(url.expose(), "rediss://default:pw@redis.example.test:6380");
                assert!(
                    !format!("{url:?}").contains("pw"),
                    "the password stays secret"
                );
            }
            other => panic!("expected the Redis store, got {other:?}"),
        }
        assert!(
            matches!(conflict, ConfigError::Conflict { var: REDIS_URL, .. }),
            "{conflict}"
        );
        assert!(
            matches!(refused, ConfigError::Invalid { var: REDIS_URL, .. }),
            "{refused}"
        );
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        // Arrange
        let vars = [
            (UPSTASH_URL, "https://example.upstash.io"),
            (UPSTASH_TOKEN, "upstash-SECRET-123"),
            (SUPABASE_KEY, "supabase-SECRET-456"),
        ];
        let config = config(&vars).expect("valid");

        // Act
        let debugged = format!("{config:?} {config:#?}");

        // Assert
        assert!(!debugged.contains("SECRET"), "{debugged}");
        assert!(debugged.contains("[redacted]"));
    }

    #[test]
    fn secret_displays_as_redacted_but_exposes_its_value() {
        // Arrange
        let secret = Secret::new("hunter2");

        // Act
        let shown = format!("{secret} {secret:?}");

        // Assert
        assert_eq!(shown, "[redacted] [redacted]");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn refresh_not_shorter_than_code_ttl_is_rejected_with_the_reason() {
        // Arrange
        let vars = [(CODE_TTL, "300"), (REFRESH, "300")];

        // Act
        let error = error(&vars);

        // Assert
        assert_eq!(error.var(), Some(REFRESH));
        assert_eq!(
            error.to_string(),
            "PAIR_REFRESH_SECS (300) must be less than PAIR_CODE_TTL_SECS (300), otherwise the \
             stored code could expire before its replacement is fetched"
        );
    }

    #[test]
    fn default_refresh_against_a_shorter_code_ttl_is_rejected() {
        // Arrange
        let vars = [(CODE_TTL, "120")];

        // Act
        let error = error(&vars);

        // Assert
        assert_eq!(error.var(), Some(REFRESH));
    }

    #[test]
    fn backoff_base_above_cap_is_rejected() {
        // Arrange
        let vars = [(BACKOFF_BASE, "2000"), (BACKOFF_CAP, "1000")];

        // Act
        let error = error(&vars);

        // Assert
        assert_eq!(error.var(), Some(BACKOFF_BASE));
        assert!(
            error
                .to_string()
                .contains("must be at most PAIR_BACKOFF_CAP_MS (1000)")
        );
    }

    #[test]
    fn backoff_base_equal_to_cap_is_accepted() {
        // Arrange
        let vars = [(BACKOFF_BASE, "1000"), (BACKOFF_CAP, "1000")];

        // Act
        let config = config(&vars).expect("valid");

        // Assert
        assert_eq!(config.backoff_base, config.backoff_cap);
    }

    #[test]
    fn sandbox_accepts_the_documented_spellings_in_any_case() {
        // Arrange
        let cases = [
            ("1", true),
            ("true", true),
            ("TRUE", true),
            ("Yes", true),
            ("0", false),
            ("false", false),
            ("False", false),
            ("NO", false),
        ];

        for (value, expected) in cases {
            // Act
            let config = config(&[(WA_SANDBOX, value)]).expect("valid");

            // Assert
            assert_eq!(config.wa_sandbox, expected, "{value:?}");
        }
    }

    #[test]
    fn sandbox_rejects_other_spellings() {
        // Arrange
        let values = ["on", "off", "y", "2", "truee"];

        for value in values {
            // Act
            let error = error(&[(WA_SANDBOX, value)]);

            // Assert
            assert_eq!(
                error.to_string(),
                format!("WA_SANDBOX must be one of 1, 0, true, false, yes, no, got {value:?}")
            );
        }
    }

    #[test]
    fn later_pairs_override_earlier_ones() {
        // Arrange
        let vars = [(PORT, "1000"), (PORT, "2000")];

        // Act
        let config = config(&vars).expect("valid");

        // Assert
        assert_eq!(config.port, 2000);
    }

    #[test]
    fn ipv6_host_gives_a_bracketed_listen_address() {
        // Arrange
        let vars = [(HOST, "::"), (PORT, "9000"), (ALLOW_UNAUTHENTICATED, "1")];

        // Act
        let addr = config(&vars).expect("valid").listen_addr();

        // Assert
        assert_eq!(addr.to_string(), "[::]:9000");
    }
}
