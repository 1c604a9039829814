//! A device store's files on disk: deleting an unlinked one, setting a
//! replaced one aside, and finishing what earlier builds left in the warm
//! pool's directory (they kept warm clients' stores there and moved a
//! linked one home when it closed).
//!
//! A device store is SQLite's main file plus its side files (`-wal`,
//! `-shm`, `-journal`), which are only consistent together: every move
//! here moves them all, and only once the store is closed.

use std::path::{Path, PathBuf};

use crate::link::LinkError;

/// SQLite's side files of a store, beside the main file.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];
/// Suffix of the copy [`snapshot`] makes of a store, beside it, while it
/// reads it.
const SNAPSHOT: &str = "-snapshot";
/// Suffix of the marker earlier builds gave a warm client's store when its
/// phone linked: the marker holds the file name the device belongs under.
const HOME_MARKER: &str = ".home";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// Deletes an unlinked device's store: `path`, SQLite's side files and any
/// home marker.
pub(super) async fn remove_device_files(path: &Path) {
    let all = std::iter::once("")
        .chain(SIDE_FILES)
        .chain([HOME_MARKER, SNAPSHOT]);
    for suffix in all {
        let file = with_suffix(path, suffix);
        match tokio::fs::remove_file(&file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The path holds the phone number: name only the kind of file.
            Err(e) => tracing::warn!(
                file = if suffix.is_empty() { "db" } else { suffix },
                error = %e,
                "could not delete an unlinked device's file"
            ),
        }
    }
}

/// A consistent copy of the store at `path`, as the bytes of one SQLite
/// file; `None` when there is no store.
///
/// Not the main file as it lies: the store is in WAL mode, so until its
/// last connection closes, recent writes (the device itself, right after
/// the link) are only in the `-wal` file and the main file can be little
/// more than its header. `VACUUM INTO` writes what a reader sees at one
/// instant, the log included, into a file of its own, without writing to
/// the store.
pub(super) async fn snapshot(path: &Path) -> Result<Option<Vec<u8>>, LinkError> {
    if !tokio::fs::try_exists(path).await.unwrap_or(false) {
        return Ok(None);
    }
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || snapshot_blocking(&path))
        .await
        .map_err(|e| LinkError::Storage(format!("copying the device store: {e}")))?
        .map(Some)
}

/// How long the copy waits for a writer's lock before giving up.
const SNAPSHOT_BUSY_TIMEOUT_MS: u32 = 5_000;

fn snapshot_blocking(path: &Path) -> Result<Vec<u8>, LinkError> {
    use diesel::{Connection as _, RunQueryDsl as _, sql_types::Text};

    let failed = |what: &str, e: &dyn std::fmt::Display| {
        LinkError::Storage(format!("copying the device store ({what}): {e}"))
    };
    let copy = with_suffix(path, SNAPSHOT);
    let _ = std::fs::remove_file(&copy);
    // Read-only: the copy must never create or change the store.
    let url = format!("file:{}?mode=ro", path.display());
    let mut connection =
        diesel::SqliteConnection::establish(&url).map_err(|e| failed("opening", &e))?;
    diesel::sql_query(format!("PRAGMA busy_timeout = {SNAPSHOT_BUSY_TIMEOUT_MS}"))
        .execute(&mut connection)
        .map_err(|e| failed("busy timeout", &e))?;
    let copied = diesel::sql_query("VACUUM INTO ?")
        .bind::<Text, _>(copy.to_string_lossy())
        .execute(&mut connection)
        .map_err(|e| failed("vacuum", &e))
        .and_then(|_| std::fs::read(&copy).map_err(|e| failed("reading", &e)));
    let _ = std::fs::remove_file(&copy);
    copied
}

/// Moves `path` (and SQLite's side files) to `path.replaced-<unix time>`.
pub(super) async fn set_aside(path: &Path) -> Result<PathBuf, LinkError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let target = PathBuf::from(format!("{}.replaced-{stamp}", path.display()));
    tokio::fs::rename(path, &target)
        .await
        .map_err(|e| LinkError::Storage(format!("setting aside {path:?}: {e}")))?;
    for suffix in ["-wal", "-shm"] {
        let side = with_suffix(path, suffix);
        if tokio::fs::try_exists(&side).await.unwrap_or(false) {
            let _ = tokio::fs::rename(&side, with_suffix(&target, suffix)).await;
        }
    }
    Ok(target)
}

/// A new link needs a new device: the device already stored at `path` for
/// `phone` is kept aside (see [`set_aside`]) rather than destroyed.
pub(super) async fn keep_earlier_device_aside(
    path: &Path,
    phone: &crate::phone::PhoneNumber,
) -> Result<(), LinkError> {
    let kept = set_aside(path).await?;
    tracing::warn!(
        phone = %phone,
        kept = %kept.display(),
        "phone already had a linked device here; kept it aside and pairing a new one"
    );
    Ok(())
}

/// Moves a closed, linked store from `store` to `home` with its side files,
/// and drops its home marker. Never overwrites: an existing `home` is set
/// aside first.
pub(super) async fn move_home(store: &Path, home: &Path) -> Result<(), LinkError> {
    if tokio::fs::try_exists(home).await.unwrap_or(false) {
        set_aside(home).await?;
    }
    for suffix in SIDE_FILES {
        let side = with_suffix(store, suffix);
        match tokio::fs::rename(&side, with_suffix(home, suffix)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LinkError::Storage(format!("moving {side:?}: {e}"))),
        }
    }
    tokio::fs::rename(store, home)
        .await
        .map_err(|e| LinkError::Storage(format!("moving {store:?}: {e}")))?;
    let _ = tokio::fs::remove_file(with_suffix(store, HOME_MARKER)).await;
    Ok(())
}

/// What [`recover_warm_dir`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Recovered {
    /// Linked devices moved to where they belong.
    pub moved: usize,
    /// Unlinked stores deleted.
    pub deleted: usize,
}

/// Cleans up after an earlier build that stopped without closing its warm
/// clients, and removes the directory: a store with a home marker linked a phone and is moved to
/// `data_dir/<name>`; every other file is an unlinked device and is deleted.
/// Only one process may use a data directory (as for the device stores).
pub(super) async fn recover_warm_dir(
    data_dir: &Path,
    warm_dir: &Path,
) -> std::io::Result<Recovered> {
    let mut recovered = Recovered::default();
    let mut entries = match tokio::fs::read_dir(warm_dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(recovered),
        Err(e) => return Err(e),
    };
    let mut stores = Vec::new();
    while let Some(entry) = entries.next_entry().await? {
        if let Some(name) = entry.file_name().to_str()
            && name.ends_with(".db")
        {
            stores.push(entry.path());
        }
    }
    for store in stores {
        let marker = with_suffix(&store, HOME_MARKER);
        match tokio::fs::read_to_string(&marker).await {
            Ok(name) if is_plain_file_name(name.trim()) => {
                match move_home(&store, &data_dir.join(name.trim())).await {
                    Ok(()) => recovered.moved += 1,
                    Err(e) => tracing::error!(error = %e, "could not recover a linked device"),
                }
            }
            _ => {
                remove_device_files(&store).await;
                recovered.deleted += 1;
            }
        }
    }
    // Side files whose main file is gone.
    let mut entries = tokio::fs::read_dir(warm_dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let _ = tokio::fs::remove_file(entry.path()).await;
    }
    // Nothing uses the directory any more.
    let _ = tokio::fs::remove_dir(warm_dir).await;
    Ok(recovered)
}

/// A marker's content must name a file in the data directory, nothing more.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.ends_with(".db")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use diesel::{Connection as _, RunQueryDsl as _};

    use super::*;

    async fn touch(path: &Path, content: &str) {
        tokio::fs::write(path, content).await.unwrap();
    }

    fn open(path: &Path) -> diesel::SqliteConnection {
        diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap()
    }

    /// How many rows `device` has in the database made of `bytes` alone.
    fn devices_in(bytes: &[u8]) -> Result<i64, diesel::result::Error> {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        std::fs::write(&path, bytes).unwrap();
        let counted: Vec<Count> =
            diesel::sql_query("SELECT count(*) AS n FROM device").load(&mut open(&path))?;
        Ok(counted[0].n)
    }

    #[tokio::test]
    async fn a_snapshot_holds_what_is_still_in_the_write_ahead_log_and_leaves_no_file() {
        // Arrange: a WAL store whose writer is still open, so its last
        // writes are in the log, not the main file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("6281234567890.db");
        let mut writer = open(&path);
        for statement in [
            "PRAGMA journal_mode = WAL",
            "PRAGMA wal_autocheckpoint = 0",
            "CREATE TABLE device (id INTEGER PRIMARY KEY)",
            "INSERT INTO device (id) VALUES (1)",
        ] {
            diesel::sql_query(statement).execute(&mut writer).unwrap();
        }
        let files_before = names(dir.path());

        // Act
        let copy = snapshot(&path).await.unwrap().expect("a store");
        let missing = snapshot(&dir.path().join("6289999999999.db"))
            .await
            .unwrap();

        // Assert
        let main_file_alone = std::fs::read(&path).unwrap();
        assert!(
            devices_in(&main_file_alone).is_err(),
            "the row is in the log"
        );
        assert_eq!(devices_in(&copy).unwrap(), 1);
        assert!(missing.is_none());
        assert_eq!(names(dir.path()), files_before, "no copy left behind");
        drop(writer);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn recovery_moves_a_marked_store_home_and_deletes_the_rest_and_the_directory() {
        // Arrange
        let data = tempfile::tempdir().unwrap();
        let warm = data.path().join(".warm");
        tokio::fs::create_dir(&warm).await.unwrap();
        touch(&warm.join("1.db"), "linked").await;
        touch(&warm.join("1.db-wal"), "wal").await;
        touch(&warm.join("1.db.home"), "6281234567890.db").await;
        touch(&warm.join("2.db"), "unlinked").await;
        touch(&warm.join("2.db-shm"), "shm").await;
        touch(&warm.join("3.db-wal"), "orphan").await;

        // Act
        let recovered = recover_warm_dir(data.path(), &warm).await.unwrap();

        // Assert
        assert_eq!(
            recovered,
            Recovered {
                moved: 1,
                deleted: 1
            }
        );
        assert!(!warm.exists(), "the directory is gone");
        assert_eq!(
            names(data.path()),
            vec!["6281234567890.db", "6281234567890.db-wal"]
        );
        let moved = tokio::fs::read_to_string(data.path().join("6281234567890.db"))
            .await
            .unwrap();
        assert_eq!(moved, "linked");
    }

    #[tokio::test]
    async fn recovery_ignores_a_marker_that_points_outside_the_data_dir() {
        // Arrange
        let data = tempfile::tempdir().unwrap();
        let warm = data.path().join(".warm");
        tokio::fs::create_dir(&warm).await.unwrap();
        touch(&warm.join("1.db"), "x").await;
        touch(&warm.join("1.db.home"), "../../etc/passwd.db").await;

        // Act
        let recovered = recover_warm_dir(data.path(), &warm).await.unwrap();

        // Assert
        assert_eq!(recovered.deleted, 1);
        assert_eq!(names(data.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn moving_home_sets_an_existing_device_aside_instead_of_overwriting_it() {
        // Arrange
        let data = tempfile::tempdir().unwrap();
        let store = data.path().join("warm.db");
        let home = data.path().join("628.db");
        touch(&store, "new").await;
        touch(&home, "old").await;

        // Act
        move_home(&store, &home).await.unwrap();

        // Assert
        let names = names(data.path());
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[1].starts_with("628.db.replaced-"), "{names:?}");
        assert_eq!(tokio::fs::read_to_string(&home).await.unwrap(), "new");
    }
}
