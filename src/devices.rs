//! Linked devices in PostgreSQL (`DATABASE_URL`): each device's store is
//! saved in the `linked_devices` table right after its link, so whatever
//! runs the account next (this service after a restart with an empty
//! `DATA_DIR`, another replica, a bot) finds it by phone.
//!
//! The row is the device's whole store as whatsapp-rust wrote it (a SQLite
//! database file, closed and complete): write `device` to `<phone>.db` and
//! open it with whatsapp-rust's SQLite store. The table is created by the
//! migrations in `migrations/`, run at startup.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::phone::PhoneNumber;

/// How long connecting may take: a slow database must not hold a request
/// or a startup for long.
pub const DEVICES_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one query.
pub const DEVICES_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting and migrating at startup (a migration waits for
/// another process's under a lock).
pub const DEVICES_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The migrations, in order: (version, SQL). Each runs once per database,
/// recorded in `wa_pair_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_linked_devices.sql"))];
/// Serialises the migrations of processes starting at once (a Postgres
/// advisory lock key: any number no other application uses).
const MIGRATION_LOCK: i64 = 0x7761_7061_6972; // "wapair"

/// What went wrong with the device database; the text never holds the
/// URL's password.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The database refused or did not answer.
    #[error("PostgreSQL: {0}")]
    Database(String),
    /// The table could not be created or brought up to date.
    #[error("PostgreSQL migrations: {0}")]
    Migrations(String),
    /// No answer within [`DEVICES_QUERY_TIMEOUT`].
    #[error("PostgreSQL did not answer in time")]
    Timeout,
    /// The connection is gone.
    #[error("PostgreSQL connection closed: {0}")]
    Closed(String),
}

/// A device saved in the table.
#[derive(Clone, PartialEq, Eq)]
pub struct SavedDevice {
    /// The phone, digits only.
    pub phone: String,
    /// The linked device's JID.
    pub jid: String,
    /// The device's store (a SQLite database file).
    pub device: Vec<u8>,
    /// When it was saved.
    pub linked_at: OffsetDateTime,
}

impl std::fmt::Debug for SavedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store holds the device's keys: never printed.
        f.debug_struct("SavedDevice")
            .field("device_bytes", &self.device.len())
            .finish_non_exhaustive()
    }
}

/// The `linked_devices` table, over one connection made when first needed
/// and made again when it breaks.
pub struct DeviceVault {
    config: Config,
    tls: Tls,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

/// How the connection is made: over TLS, the server's certificate checked
/// (see [`rustls`]), unless the URL says `sslmode=disable`; with
/// `sslmode=prefer` (the default) a server that offers no TLS is spoken to
/// in the clear, as libpq does.
#[derive(Clone)]
enum Tls {
    Rustls(MakeRustlsConnect),
    Off,
}

impl std::fmt::Debug for DeviceVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the password.
        f.debug_struct("DeviceVault").finish_non_exhaustive()
    }
}

fn database(error: tokio_postgres::Error) -> DevicesError {
    if error.is_closed() {
        return DevicesError::Closed(error.to_string());
    }
    // The server's own words (code and message) say more than the
    // driver's "db error"; its detail, which can quote values, is left out.
    match error.as_db_error() {
        Some(db) => DevicesError::Database(format!("{} ({})", db.message(), db.code().code())),
        None => DevicesError::Database(error.to_string()),
    }
}

/// `query`, within [`DEVICES_QUERY_TIMEOUT`].
async fn bounded<T>(
    query: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DevicesError> {
    tokio::time::timeout(DEVICES_QUERY_TIMEOUT, query)
        .await
        .map_err(|_| DevicesError::Timeout)?
        .map_err(database)
}

/// rustls checking the server's certificate against `ca` (PEM: the CA
/// that signs it, e.g. Supabase's), or the web's public roots without one.
fn rustls(ca: Option<&str>) -> Result<MakeRustlsConnect, DevicesError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| DevicesError::Database("DATABASE_CA_CERT is not PEM".into()))?;
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(DevicesError::Database(
                    "DATABASE_CA_CERT holds no usable certificate".into(),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DevicesError::Database(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

impl DeviceVault {
    /// Connects to `url` (TLS checked against `ca`, PEM, when given) and
    /// creates or updates the table, within [`DEVICES_STARTUP_TIMEOUT`].
    pub async fn connect(url: &str, ca: Option<&str>) -> Result<Self, DevicesError> {
        let mut config: Config = url.parse().map_err(|_| {
            DevicesError::Database(
                "DATABASE_URL is not a PostgreSQL URL tokio-postgres reads (sslmode may be \
                 disable, prefer or require)"
                    .into(),
            )
        })?;
        // A connection that died without a word is noticed in about a
        // minute, not the kernel's two hours.
        config
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(DEVICES_QUERY_TIMEOUT * 6);
        let tls = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => Tls::Off,
            _ => Tls::Rustls(rustls(ca)?),
        };
        let vault = Self {
            config,
            tls,
            client: tokio::sync::Mutex::new(None),
        };
        tokio::time::timeout(DEVICES_STARTUP_TIMEOUT, async {
            let mut migrating = vault.open().await?;
            migrate(&mut migrating).await
        })
        .await
        .map_err(|_| DevicesError::Timeout)??;
        Ok(vault)
    }

    /// Forgets the shared connection after `error`, when it says the
    /// connection is no good (timed out, closed): the next call makes a new
    /// one.
    async fn forget_after(&self, error: &DevicesError) {
        if matches!(error, DevicesError::Timeout | DevicesError::Closed(_)) {
            self.client.lock().await.take();
        }
    }

    /// A new connection; its driver runs beside it until the client is
    /// dropped.
    async fn open(&self) -> Result<Client, DevicesError> {
        let connect = async {
            match &self.tls {
                Tls::Rustls(tls) => {
                    let (client, connection) = self.config.connect(tls.clone()).await?;
                    tokio::spawn(drive(connection));
                    Ok(client)
                }
                Tls::Off => {
                    let (client, connection) = self.config.connect(NoTls).await?;
                    tokio::spawn(drive(connection));
                    Ok(client)
                }
            }
        };
        tokio::time::timeout(DEVICES_CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| DevicesError::Timeout)?
            .map_err(database)
    }

    /// The shared connection, made again if it broke.
    async fn client(&self) -> Result<Arc<Client>, DevicesError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|client| !client.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(self.open().await?);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Saves `phone`'s device `jid`, linked at `linked_at`, with its store
    /// `device`, replacing an earlier link of the phone (never a later one).
    pub async fn save(
        &self,
        phone: &PhoneNumber,
        jid: &str,
        device: &[u8],
        linked_at: OffsetDateTime,
    ) -> Result<(), DevicesError> {
        let client = self.client().await?;
        let saved = bounded(client.execute(
            "INSERT INTO linked_devices (phone, jid, device, linked_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (phone) DO UPDATE \
             SET jid = EXCLUDED.jid, device = EXCLUDED.device, linked_at = EXCLUDED.linked_at \
             WHERE linked_devices.linked_at <= EXCLUDED.linked_at",
            &[&phone.as_str(), &jid, &device, &linked_at],
        ))
        .await;
        if let Err(e) = &saved {
            self.forget_after(e).await;
        }
        saved.map(drop)
    }

    /// `phone`'s saved device, if any.
    pub async fn load(&self, phone: &PhoneNumber) -> Result<Option<SavedDevice>, DevicesError> {
        let client = self.client().await?;
        let row = bounded(client.query_opt(
            "SELECT phone, jid, device, linked_at FROM linked_devices WHERE phone = $1",
            &[&phone.as_str()],
        ))
        .await;
        if let Err(e) = &row {
            self.forget_after(e).await;
        }
        let row = row?;
        Ok(row.map(|row| SavedDevice {
            phone: row.get(0),
            jid: row.get(1),
            device: row.get(2),
            linked_at: row.get(3),
        }))
    }

    /// Whether a device of `phone` is saved.
    pub async fn has(&self, phone: &PhoneNumber) -> Result<bool, DevicesError> {
        let client = self.client().await?;
        let row = bounded(client.query_one(
            "SELECT EXISTS (SELECT 1 FROM linked_devices WHERE phone = $1)",
            &[&phone.as_str()],
        ))
        .await;
        if let Err(e) = &row {
            self.forget_after(e).await;
        }
        Ok(row?.get(0))
    }
}

/// Drives a connection until its client is dropped or it breaks.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "device database connection ended");
    }
}

/// Runs the migrations not yet recorded, in one transaction that holds an
/// advisory lock (processes starting at once migrate one after the other).
async fn migrate(client: &mut Client) -> Result<(), DevicesError> {
    let failed = |e: tokio_postgres::Error| DevicesError::Migrations(database(e).to_string());
    let transaction = client.transaction().await.map_err(failed)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(failed)?;
    // Row Level Security with no policy, as for the devices: where the
    // database serves an API of its own, nobody can mark a migration done.
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS wa_pair_migrations (\
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); \
             ALTER TABLE wa_pair_migrations ENABLE ROW LEVEL SECURITY",
        )
        .await
        .map_err(failed)?;
    for (version, sql) in MIGRATIONS {
        let done = transaction
            .query_opt(
                "SELECT 1 FROM wa_pair_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(failed)?;
        if done.is_none() {
            transaction.batch_execute(sql).await.map_err(failed)?;
            transaction
                .execute(
                    "INSERT INTO wa_pair_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(failed)?;
        }
    }
    transaction.commit().await.map_err(failed)
}
