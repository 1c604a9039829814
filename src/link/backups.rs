//! Devices set aside by a re-link (`<phone>.db.replaced-<unix time>`, and
//! their `-wal`/`-shm`) are kept for a while, in case the re-link was a
//! mistake, and then deleted: nothing else ever would, and each holds a
//! linked account's credentials.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// How often the sweep runs after the one at startup.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// What marks a set-aside device file; the unix time follows.
const MARKER: &str = ".replaced-";

/// When `name` was set aside, if it is a set-aside device file.
fn set_aside_at(name: &str) -> Option<SystemTime> {
    let (_, rest) = name.rsplit_once(MARKER)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let side = &rest[digits.len()..];
    if digits.is_empty() || !matches!(side, "" | "-wal" | "-shm") {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs(digits.parse().ok()?))
}

/// Deletes the set-aside device files in `data_dir` older than
/// `retention`; returns how many. Other files are never touched.
pub async fn sweep(data_dir: &Path, retention: Duration) -> std::io::Result<usize> {
    let now = SystemTime::now();
    let mut entries = match tokio::fs::read_dir(data_dir).await {
        Ok(entries) => entries,
        // Nothing linked yet: no directory, nothing to sweep.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut deleted = 0;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        let Some(at) = name.to_str().and_then(set_aside_at) else {
            continue;
        };
        if now.duration_since(at).unwrap_or_default() < retention {
            continue;
        }
        match tokio::fs::remove_file(entry.path()).await {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The name holds the phone number: say what kind of file only.
            Err(e) => tracing::warn!(error = %e, "could not delete a set-aside device file"),
        }
    }
    Ok(deleted)
}

/// Sweeps now and every [`SWEEP_INTERVAL`] until `stop` turns true.
pub async fn sweep_until_stopped(
    data_dir: std::path::PathBuf,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match sweep(&data_dir, retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(
                deleted,
                retention_secs = retention.as_secs(),
                event = "backups_swept",
                "deleted set-aside device files past their retention"
            ),
            Err(e) => tracing::warn!(error = %e, "sweeping set-aside device files failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(age: Duration) -> u64 {
        (SystemTime::now() - age)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn only_set_aside_device_files_are_recognised() {
        assert!(set_aside_at("628123456789.db.replaced-1700000000").is_some());
        assert!(set_aside_at("628123456789.db.replaced-1700000000-wal").is_some());
        assert!(set_aside_at("628123456789.db.replaced-1700000000-shm").is_some());
        assert!(set_aside_at("628123456789.db").is_none());
        assert!(set_aside_at("628123456789.db.replaced-").is_none());
        assert!(set_aside_at("628123456789.db.replaced-17x").is_none());
        assert!(set_aside_at("notes.txt").is_none());
    }

    #[tokio::test]
    async fn files_past_their_retention_go_and_everything_else_stays() {
        let dir = tempfile::tempdir().unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        let old = stamp(week + Duration::from_secs(60));
        let recent = stamp(Duration::from_secs(3600));
        let names = [
            format!("628111111111.db.replaced-{old}"),
            format!("628111111111.db.replaced-{old}-wal"),
            format!("628222222222.db.replaced-{recent}"),
            "628333333333.db".to_owned(),
            "628333333333.db-wal".to_owned(),
        ];
        for name in &names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }

        let deleted = sweep(dir.path(), week).await.unwrap();

        assert_eq!(deleted, 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [names[2].clone(), names[3].clone(), names[4].clone()]);
    }

    #[tokio::test]
    async fn a_missing_data_directory_is_nothing_to_sweep() {
        let dir = tempfile::tempdir().unwrap();

        let deleted = sweep(&dir.path().join("absent"), Duration::ZERO).await;

        assert_eq!(deleted.unwrap(), 0);
    }
}
