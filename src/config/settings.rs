//! Every setting in one table: its variable, its default and what it does.
//!
//! The README's configuration table and `.env.example` are checked against
//! this table by tests (`config::tests`), and each default written here is
//! checked against what [`Config::default`](super::Config::default) holds,
//! so the three cannot drift apart. The typed parsing lives in
//! [`Config::from_vars`](super::Config::from_vars).

pub(super) const HOST: &str = "HOST";
pub(super) const PORT: &str = "PORT";
pub(super) const LOG_FORMAT: &str = "LOG_FORMAT";
pub(super) const RUST_LOG: &str = "RUST_LOG";
pub(super) const DATA_DIR: &str = "DATA_DIR";
pub(super) const WA_WS_URL: &str = "WA_WS_URL";
pub(super) const WA_VERSION: &str = "WA_VERSION";
pub(super) const WA_SANDBOX: &str = "WA_SANDBOX";
pub(super) const UPSTASH_URL: &str = "UPSTASH_REDIS_REST_URL";
pub(super) const UPSTASH_TOKEN: &str = "UPSTASH_REDIS_REST_TOKEN";
pub(super) const REDIS_URL: &str = "REDIS_URL";
pub(super) const DATABASE_URL: &str = "DATABASE_URL";
pub(super) const DATABASE_CA_CERT: &str = "DATABASE_CA_CERT";
pub(super) const KEY_PREFIX: &str = "PAIR_KEY_PREFIX";
pub(super) const CODE_TTL: &str = "PAIR_CODE_TTL_SECS";
pub(super) const REFRESH: &str = "PAIR_REFRESH_SECS";
pub(super) const CODE_WAIT: &str = "PAIR_CODE_WAIT_SECS";
pub(super) const SSE_KEEPALIVE: &str = "SSE_KEEPALIVE_SECS";
pub(super) const UI_ENABLED: &str = "UI_ENABLED";
pub(super) const WEBHOOK_URL: &str = "WEBHOOK_URL";
pub(super) const WEBHOOK_SECRET: &str = "WEBHOOK_SECRET";
pub(super) const SESSION_MAX: &str = "PAIR_SESSION_MAX_SECS";
pub(super) const OUTCOME_TTL: &str = "PAIR_OUTCOME_TTL_SECS";
pub(super) const BACKOFF_BASE: &str = "PAIR_BACKOFF_BASE_MS";
pub(super) const BACKOFF_CAP: &str = "PAIR_BACKOFF_CAP_MS";
pub(super) const MAX_ATTEMPTS: &str = "PAIR_MAX_ATTEMPTS";
pub(super) const SHUTDOWN_GRACE: &str = "SHUTDOWN_GRACE_SECS";
pub(super) const SUPABASE_URL: &str = "SUPABASE_URL";
pub(super) const SUPABASE_KEY: &str = "SUPABASE_SERVICE_ROLE_KEY";
pub(super) const SUPABASE_JWT_SECRET: &str = "SUPABASE_JWT_SECRET";
pub(super) const API_KEYS: &str = "API_KEYS";
pub(super) const ALLOW_UNAUTHENTICATED: &str = "ALLOW_UNAUTHENTICATED";
pub(super) const CORS_ALLOWED_ORIGINS: &str = "CORS_ALLOWED_ORIGINS";
pub(super) const SESSIONS_PER_USER: &str = "PAIR_SESSIONS_PER_USER";
pub(super) const WARM_CLIENTS: &str = "PAIR_WARM_CLIENTS";
pub(super) const HEADER_TIMEOUT: &str = "HTTP_HEADER_TIMEOUT_SECS";
pub(super) const STARTS_PER_MINUTE: &str = "RATE_LIMIT_STARTS_PER_MIN";
pub(super) const READS_PER_MINUTE: &str = "RATE_LIMIT_READS_PER_MIN";
pub(super) const TRUST_PROXY: &str = "TRUST_PROXY";
pub(super) const CODES_PER_HOUR: &str = "PAIR_CODES_PER_HOUR";
pub(super) const BACKUP_RETENTION: &str = "DEVICE_BACKUP_RETENTION_SECS";
pub(super) const MAX_CONNECTIONS: &str = "HTTP_MAX_CONNECTIONS";

/// A setting's default, as people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingDefault {
    /// This value, written as in `.env`.
    Value(&'static str),
    /// No value; the text says what that means (`unset: state kept in memory`).
    Unset(&'static str),
}

/// One environment variable the service reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The variable's name.
    pub name: &'static str,
    /// What applies when it is unset or empty.
    pub default: SettingDefault,
    /// What it does, as the README's configuration table says it.
    pub doc: &'static str,
}

impl Setting {
    /// The setting's row in the README's configuration table.
    pub fn readme_row(&self) -> String {
        let default = match self.default {
            SettingDefault::Value(value) => format!("`{value}`"),
            SettingDefault::Unset(meaning) => meaning.to_owned(),
        };
        format!("| `{}` | {default} | {} |", self.name, self.doc)
    }
}

/// Every setting, in the README's order; [`Config::from_env`](super::Config::from_env)
/// looks up exactly these.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: HOST,
        default: SettingDefault::Value("127.0.0.1"),
        doc: "Address to listen on: an IP address (IPv4 or IPv6, e.g. `0.0.0.0`, `::`); host names such as `localhost` are rejected. Loopback by default so a local `cargo run` is not reachable from the network; the Docker image sets `0.0.0.0`.",
    },
    Setting {
        name: PORT,
        default: SettingDefault::Value("8080"),
        doc: "Port to listen on, 1 to 65535. Railway sets it.",
    },
    Setting {
        name: LOG_FORMAT,
        default: SettingDefault::Value("json"),
        doc: "`json` (one object per line, for log collectors) or `pretty` (human-readable, for local development); any case.",
    },
    Setting {
        name: RUST_LOG,
        default: SettingDefault::Value("info,whatsapp_rust=warn,wacore=warn,Client=warn"),
        doc: "Tracing filter directives, e.g. `wa_pair=debug,info` (the default keeps the WhatsApp library's step-by-step `info` out). Validated at startup, so a typo fails instead of silencing logs.",
    },
    Setting {
        name: DATA_DIR,
        default: SettingDefault::Value("./data"),
        doc: "Directory for local state: one SQLite device store per phone, `<phone>.db`. Relative paths are relative to the working directory. The Docker image sets `/data`.",
    },
    Setting {
        name: WA_WS_URL,
        default: SettingDefault::Unset("unset: the library's WhatsApp endpoint"),
        doc: "WhatsApp WebSocket endpoint override: a `ws://` or `wss://` URL with a host, e.g. `wss://web.whatsapp.com/ws/chat`.",
    },
    Setting {
        name: WA_VERSION,
        default: SettingDefault::Unset("unset: fetched from WhatsApp"),
        doc: "WhatsApp Web client version pin: three dot-separated numbers, each fitting in 32 bits, e.g. `2.3000.1023456789`. Unset, the version is fetched from `web.whatsapp.com/sw.js` once per process and shared by every link client (fetched again daily; on failure the last one is kept, and with none known each client fetches its own).",
    },
    Setting {
        name: WA_SANDBOX,
        default: SettingDefault::Value("false"),
        doc: "Run against the in-process fake WhatsApp. One of `1`, `0`, `true`, `false`, `yes`, `no`, any case. A build without `--features sandbox` refuses to start with it on; a build with the feature refuses to start with it off.",
    },
    Setting {
        name: UPSTASH_URL,
        default: SettingDefault::Unset("unset: state kept in memory"),
        doc: "Upstash REST endpoint, an `http://` or `https://` URL. Set it and the token together to use Upstash; set neither to keep state in memory (lost on restart); setting only one is a startup error.",
    },
    Setting {
        name: UPSTASH_TOKEN,
        default: SettingDefault::Unset("unset"),
        doc: "Upstash REST token (secret). Required when `UPSTASH_REDIS_REST_URL` is set.",
    },
    Setting {
        name: REDIS_URL,
        default: SettingDefault::Unset("unset: Upstash REST, or memory"),
        doc: "A Redis server spoken to natively, `redis://[user:password@]host:port[/db]` or `rediss://` for TLS (Railway's Redis, a self-hosted one, or Upstash's TLS endpoint); secret, since it may carry a password. Set, it is the store instead of Upstash REST (setting both is a startup error).",
    },
    Setting {
        name: DATABASE_URL,
        default: SettingDefault::Unset("unset: linked devices only in DATA_DIR"),
        doc: "A PostgreSQL server, `postgres://user:password@host:port/db` (e.g. the Supabase project's own); secret. Over TLS with the server's certificate checked (against `DATABASE_CA_CERT`, else the public web roots); `sslmode=disable` speaks in the clear (a private network), and with `prefer`, the default, a server that offers no TLS is spoken to in the clear too. Set, every linked device's store is also saved in its `linked_devices` table right after the link (created at startup), a restart with an empty `DATA_DIR` still knows the device, and server callers can fetch it with `GET /devices/{phone}`.",
    },
    Setting {
        name: DATABASE_CA_CERT,
        default: SettingDefault::Unset("unset: the public web roots"),
        doc: "The CA that signs the database's TLS certificate, as PEM text or the path of a PEM file: for Supabase, the certificate from Project Settings → Database → SSL Configuration (Supabase signs with a CA of its own).",
    },
    Setting {
        name: KEY_PREFIX,
        default: SettingDefault::Value("wa:pair:"),
        doc: "Prefix of every store key; a key is prefix + phone, e.g. `wa:pair:628123456789`. Used as written.",
    },
    Setting {
        name: CODE_TTL,
        default: SettingDefault::Value("600"),
        doc: "How long a stored starting/pending state lives in Redis.",
    },
    Setting {
        name: REFRESH,
        default: SettingDefault::Value("480"),
        doc: "A fresh code is requested at least this often. Must be less than `PAIR_CODE_TTL_SECS`, otherwise the stored code could expire before its replacement is fetched.",
    },
    Setting {
        name: CODE_WAIT,
        default: SettingDefault::Value("20"),
        doc: "How long `POST /pair` waits for the first code before answering `202` with status `starting`.",
    },
    Setting {
        name: SSE_KEEPALIVE,
        default: SettingDefault::Value("15"),
        doc: "How often `GET /pair/{phone}/events` sends a keep-alive comment while the state does not change, so proxies (Railway's included) do not close an idle stream. 1 to 300.",
    },
    Setting {
        name: WEBHOOK_URL,
        default: SettingDefault::Unset("unset: no webhook"),
        doc: "Where outcomes are POSTed (`linked`, `failed`, `expired`, `cancelled`), an `http://` or `https://` URL; signed as Standard Webhooks do, retried for up to an hour (see \"Webhook\" in the README). Set it and `WEBHOOK_SECRET` together; unset, no webhook is sent.",
    },
    Setting {
        name: WEBHOOK_SECRET,
        default: SettingDefault::Unset("unset"),
        doc: "Signing secret of the webhook (secret): `whsec_` followed by base64 (as Standard Webhooks libraries make them; the key is the decoded bytes), or any other string of at least 32 characters (the key is its bytes). Required when `WEBHOOK_URL` is set.",
    },
    Setting {
        name: UI_ENABLED,
        default: SettingDefault::Value("true"),
        doc: "Serve the pairing page at `GET /` (with `/ui/app.js` and `/ui/app.css`). One of `1`, `0`, `true`, `false`, `yes`, `no`, any case. Off, `/` answers `404`; the API is the same either way.",
    },
    Setting {
        name: SESSION_MAX,
        default: SettingDefault::Value("1800"),
        doc: "Longest life of a pairing session; a session not linked by then ends as `expired`.",
    },
    Setting {
        name: OUTCOME_TTL,
        default: SettingDefault::Value("86400"),
        doc: "How long a linked, failed, expired or cancelled outcome stays in Redis, so a late poller still learns the result.",
    },
    Setting {
        name: BACKOFF_BASE,
        default: SettingDefault::Value("1000"),
        doc: "First retry delay after a failure. At most `PAIR_BACKOFF_CAP_MS`.",
    },
    Setting {
        name: BACKOFF_CAP,
        default: SettingDefault::Value("60000"),
        doc: "Longest retry delay.",
    },
    Setting {
        name: MAX_ATTEMPTS,
        default: SettingDefault::Value("10"),
        doc: "Consecutive failures before a session ends as `failed` with reason `gave_up`; 1 to 4294967295.",
    },
    Setting {
        name: SHUTDOWN_GRACE,
        default: SettingDefault::Value("10"),
        doc: "How long shutdown (SIGTERM or ctrl-c) waits for in-flight work.",
    },
    Setting {
        name: SUPABASE_URL,
        default: SettingDefault::Unset("unset: no browser callers"),
        doc: "Supabase project URL, an `http://` or `https://` URL such as `https://<ref>.supabase.co`. When set, signed-in users of the project are callers: `Authorization: Bearer <access token>` is verified against `${SUPABASE_URL}/auth/v1/.well-known/jwks.json` (ES256, RS256), with `iss = ${SUPABASE_URL}/auth/v1` and `aud = authenticated`.",
    },
    Setting {
        name: SUPABASE_KEY,
        default: SettingDefault::Unset("unset"),
        doc: "The project's service-role key (secret). A caller sending it as the bearer token is a server caller, like an `API_KEYS` key.",
    },
    Setting {
        name: SUPABASE_JWT_SECRET,
        default: SettingDefault::Unset("unset"),
        doc: "The project's legacy JWT secret (secret), for projects whose access tokens are still HS256. Needs `SUPABASE_URL`.",
    },
    Setting {
        name: API_KEYS,
        default: SettingDefault::Unset("unset: no caller needs a key"),
        doc: "Keys of server callers (secret), comma-separated, each at least 32 printable characters without blanks (e.g. `openssl rand -hex 32`). When set, every `/pair` request needs `Authorization: Bearer <key>`. Required on a non-loopback `HOST` unless `ALLOW_UNAUTHENTICATED=true`.",
    },
    Setting {
        name: CORS_ALLOWED_ORIGINS,
        default: SettingDefault::Unset("unset: no browser origin"),
        doc: "Browser origins allowed to call the API, comma-separated exact origins such as `https://app.example.com,http://localhost:5173` (scheme, host, optional port; no path, no `*`). Preflights are answered for `GET`, `POST`, `DELETE` with `Authorization`, `Content-Type` and `X-Request-Id`; `Retry-After`, `WWW-Authenticate` and `X-Request-Id` are readable by the page.",
    },
    Setting {
        name: SESSIONS_PER_USER,
        default: SettingDefault::Value("5"),
        doc: "Most pairing sessions one signed-in Supabase user (or, with `ALLOW_UNAUTHENTICATED=true`, one client address other than loopback) may have open at once (1 to 1000); one more answers `429 too_many_sessions`. Server callers act for many users and are bounded only by the service-wide cap of 1000.",
    },
    Setting {
        name: WARM_CLIENTS,
        default: SettingDefault::Value("2"),
        doc: "Connected, unpaired WhatsApp clients kept ready (0 to 16; `0` turns the pool off). A new session takes one and only asks for its code; the pool refills in the background and replaces each client after two minutes, before WhatsApp's QR refs run out. Each costs one WhatsApp connection: see [warm pool](#warm-pool).",
    },
    Setting {
        name: HEADER_TIMEOUT,
        default: SettingDefault::Value("10"),
        doc: "A client that has not sent a request's headers this long after connecting (or after its previous answer, on a kept-alive connection) is disconnected.",
    },
    Setting {
        name: MAX_CONNECTIONS,
        default: SettingDefault::Value("1024"),
        doc: "Most HTTP connections open at once, 1 to 65535; more wait in the kernel's backlog until one closes.",
    },
    Setting {
        name: CODES_PER_HOUR,
        default: SettingDefault::Value("6"),
        doc: "Codes per phone number per hour, automatic refreshes and manual ones together (1 to 1000). Counted in the store (Upstash: one `EVAL` per code), so a restart does not reset it; the hour opens with the first code. When spent, the session stops asking WhatsApp (`reason: \"code_budget\"`, `retry_at`) and `POST /pair` and refresh answer `429 code_budget_exhausted` with `Retry-After`.",
    },
    Setting {
        name: BACKUP_RETENTION,
        default: SettingDefault::Value("604800"),
        doc: "How long the files of a device replaced by a forced re-link (`<phone>.db.replaced-<unix time>`) are kept before they are deleted; swept at startup and daily.",
    },
    Setting {
        name: STARTS_PER_MINUTE,
        default: SettingDefault::Value("10"),
        doc: "Requests that can issue a code (`POST /pair`, `POST /pair/{phone}/refresh`) per minute for each signed-in user, or each client IP when no caller is configured; server callers get 20 times as many. The whole minute's budget may be spent at once. Over it: `429 rate_limited` with `Retry-After`. 1 to 1000000.",
    },
    Setting {
        name: READS_PER_MINUTE,
        default: SettingDefault::Value("120"),
        doc: "Other API requests (`GET`, `DELETE`) per minute, counted the same way.",
    },
    Setting {
        name: TRUST_PROXY,
        default: SettingDefault::Value("false"),
        doc: "Take the client IP from the last `X-Forwarded-For` entry (the one the proxy in front appended) instead of the socket. Set it on Railway; leave it off when clients reach the service directly, or they could pick their own bucket.",
    },
    Setting {
        name: ALLOW_UNAUTHENTICATED,
        default: SettingDefault::Value("false"),
        doc: "Serve the API to anyone on a non-loopback `HOST` with no caller configured (`API_KEYS`, `SUPABASE_SERVICE_ROLE_KEY`, `SUPABASE_URL`). Logged as a warning at every start. One of `1`, `0`, `true`, `false`, `yes`, `no`.",
    },
];
