//! Retention: recordings live in day directories (`{dir}/YYYY-MM-DD/...`), so expiring them is
//! removing whole directories by name, without reading a file's metadata.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A day directory name (`YYYY-MM-DD`) as a date; `None` for any other name.
fn parse_day(name: &str) -> Option<time::Date> {
    let b = name.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = name.get(r)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(digits(5..7)?).ok()?).ok()?;
    let day = u8::try_from(digits(8..10)?).ok()?;
    time::Date::from_calendar_date(year, month, day).ok()
}

/// Remove the day directories of `dir` older than `retention_days` days before `now`'s (UTC)
/// date: with 30, on 2026-12-31 the directory `2026-12-01` is kept and `2026-11-30` removed.
/// Anything else in `dir` (files, other names) is left alone. Returns the directories removed;
/// one that cannot be removed is logged and skipped, so one bad entry never stops the sweep.
pub fn sweep(dir: &Path, retention_days: u32, now: SystemTime) -> std::io::Result<Vec<PathBuf>> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let today = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    let Some(oldest_kept) = today.checked_sub(time::Duration::days(i64::from(retention_days)))
    else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(day) = entry.file_name().to_str().and_then(parse_day) else {
            continue;
        };
        // A symlink named like a day is not ours to follow: only real directories go.
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || day >= oldest_kept {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(
                event = "recording_retention_error",
                path = %path.display(),
                error = %e,
                "could not remove an expired recordings directory"
            ),
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn day_names() {
        assert!(parse_day("2026-12-02").is_some());
        for bad in [
            "2026-13-01",
            "2026-02-30",
            "2026-1-01",
            "x026-01-01",
            "2026-01-01x",
            "+026-01-01",
        ] {
            assert!(parse_day(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn removes_only_expired_day_directories() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        for name in [
            "2026-11-01",
            "2026-11-30",
            "2026-12-01",
            "2026-12-31",
            "notes",
            "2026-1-1",
        ] {
            std::fs::create_dir(dir.join(name)).expect("mkdir");
        }
        std::fs::write(dir.join("2026-11-01").join("s.fbs"), b"x").expect("write");
        std::fs::create_dir(dir.join("2026-11-01").join("sid")).expect("mkdir");
        // A file named like an old day stays: the sweep removes directories it made.
        std::fs::write(dir.join("2020-01-01"), b"keep").expect("write");
        // 2026-12-31 00:00:10 UTC
        let now = UNIX_EPOCH + Duration::from_secs(1_798_675_210);
        let removed = sweep(dir, 30, now).expect("sweep");
        assert_eq!(removed, [dir.join("2026-11-01"), dir.join("2026-11-30")]);
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "2020-01-01",
                "2026-1-1",
                "2026-12-01",
                "2026-12-31",
                "notes"
            ]
        );
        // Nothing more to do on a second run.
        assert!(sweep(dir, 30, now).expect("sweep").is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(sweep(&root.path().join("absent"), 30, SystemTime::now()).is_err());
    }
}
