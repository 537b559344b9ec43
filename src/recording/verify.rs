//! `vncgate recording verify FILE`: is this a recording a player can replay to its end, and is
//! it the whole session?

use std::fmt;
use std::path::{Path, PathBuf};

use super::fbs::{self, FbsError, Summary};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: FbsError },
}

/// What `verify` prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Summary,
    /// A truncated last block, or the audit beside the file says the recording is incomplete
    /// (or never got its final line: the writer stopped without closing it).
    pub incomplete: bool,
    /// Why, in a few words, when incomplete.
    pub why: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(f, "duration: {:.3} s", f64::from(s.duration_ms) / 1000.0)?;
        writeln!(f, "bytes: {}", s.bytes)?;
        writeln!(f, "blocks: {}", s.blocks)?;
        writeln!(f, "size: {}x{}", s.server_init.width, s.server_init.height)?;
        writeln!(f, "name: {:?}", s.server_init.name)?;
        match &self.why {
            Some(why) if self.incomplete => write!(f, "incomplete: yes ({why})"),
            _ => write!(
                f,
                "incomplete: {}",
                if self.incomplete { "yes" } else { "no" }
            ),
        }
    }
}

pub fn verify_file(path: &Path) -> Result<Report, VerifyError> {
    let file = std::fs::File::open(path).map_err(|source| VerifyError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let summary = fbs::verify(file).map_err(|source| VerifyError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    let mut why = summary
        .truncated
        .then(|| "the last block is cut short".to_string());
    if why.is_none() {
        why = audit_incomplete(&path.with_extension("jsonl"));
    }
    Ok(Report {
        incomplete: why.is_some(),
        why,
        summary,
    })
}

/// What the `.jsonl` beside a recording says about its completeness; `None` when it says
/// complete or is absent (a file copied on its own is judged by itself).
fn audit_incomplete(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let ended = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "recording_ended");
    let Some(ended) = ended else {
        return Some("the audit has no recording_ended line".into());
    };
    if ended["incomplete"] == true {
        let reason = ended["incomplete_reason"].as_str().unwrap_or("incomplete");
        return Some(format!("the audit says {reason}"));
    }
    None
}
