//! CDR file names, torn-tail repair and retention.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::format::{Item, StrftimeItems};
use chrono::{Days, NaiveDate};

use super::{CdrError, CdrRecord};

/// The names of this pod's CDR files: `filename_pattern` formatted with the
/// day, with `.<pod>` inserted before the extension.
#[derive(Debug, Clone)]
pub struct CdrFiles {
    dir: PathBuf,
    pattern: String,
    /// The pattern without its extension.
    stem: String,
    /// The extension with its dot, or "" when the pattern has none.
    extension: String,
    pod: String,
}

impl CdrFiles {
    pub fn new(dir: impl Into<PathBuf>, pattern: &str, pod: &str) -> Result<Self, CdrError> {
        let bad = |reason: &str| CdrError::Pattern {
            pattern: pattern.to_string(),
            reason: reason.to_string(),
        };
        if pattern.is_empty() || pattern.contains('/') || pattern.contains('\\') {
            return Err(bad("must be a file name without directories"));
        }
        if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
            return Err(bad("is not a valid strftime pattern"));
        }
        // An extension is the part after the last dot, unless it is formatted.
        let (stem, extension) = match pattern.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() && !ext.contains('%') => {
                (stem.to_string(), format!(".{ext}"))
            }
            _ => (pattern.to_string(), String::new()),
        };
        let files = Self {
            dir: dir.into(),
            pattern: pattern.to_string(),
            stem,
            extension,
            pod: sanitize_pod(pod),
        };
        let sample = NaiveDate::from_ymd_opt(2026, 11, 26).unwrap_or_default();
        let name = files
            .format_stem(sample)
            .ok_or_else(|| bad("cannot be formatted"))?;
        if files.date_of(&files.file_name_from(&name)) != Some((sample, true)) {
            return Err(bad("must name the year, month and day (e.g. %Y-%m-%d)"));
        }
        Ok(files)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    fn format_stem(&self, date: NaiveDate) -> Option<String> {
        let mut out = String::new();
        write!(out, "{}", date.format(&self.stem)).ok()?;
        Some(out)
    }

    fn file_name_from(&self, formatted_stem: &str) -> String {
        format!("{formatted_stem}.{}{}", self.pod, self.extension)
    }

    /// This pod's file for one UTC day.
    pub fn path_for(&self, date: NaiveDate) -> PathBuf {
        // The pattern was checked to format in `new`; strftime cannot fail
        // for one valid date and not another.
        let stem = self
            .format_stem(date)
            .unwrap_or_else(|| self.pattern.clone());
        self.dir.join(self.file_name_from(&stem))
    }

    /// The day a CDR file (of any pod) covers, and whether it is this pod's.
    pub fn date_of(&self, file_name: &str) -> Option<(NaiveDate, bool)> {
        let without_ext = file_name.strip_suffix(self.extension.as_str())?;
        let (stem, pod) = without_ext.rsplit_once('.')?;
        let date = NaiveDate::parse_from_str(stem, &self.stem).ok()?;
        Some((date, pod == self.pod))
    }

    /// Every CDR file in the directory with its day and ownership.
    fn list(&self) -> Result<Vec<(PathBuf, NaiveDate, bool)>, CdrError> {
        let entries = fs::read_dir(&self.dir).map_err(CdrError::io(&self.dir))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((date, ours)) = self.date_of(name) {
                found.push((entry.path(), date, ours));
            }
        }
        Ok(found)
    }

    /// Repairs the torn tail of each of this pod's files (never another
    /// pod's: it may be writing its own right now).
    pub fn repair_own(&self) -> Result<(), CdrError> {
        for (path, _, ours) in self.list()? {
            if ours {
                repair_torn_tail(&path)?;
            }
        }
        Ok(())
    }

    /// Records of this pod's file for `date`, oldest first, skipping lines
    /// that do not parse; no file is no records.
    pub fn load(&self, date: NaiveDate, keep_last: usize) -> Result<Vec<CdrRecord>, CdrError> {
        let path = self.path_for(date);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CdrError::io(&path)(e)),
        };
        let records: Vec<CdrRecord> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let skip = records.len().saturating_sub(keep_last);
        Ok(records.into_iter().skip(skip).collect())
    }
}

/// Keeps a pod name usable in a file name and free of dots, so that the
/// name can be split back into day, pod and extension.
pub fn sanitize_pod(pod: &str) -> String {
    let clean: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "pbx".into()
    } else {
        clean
    }
}

/// The pod's name: `POD_NAME` (the downward API), else the host name.
pub fn pod_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            fs::read_to_string("/proc/sys/kernel/hostname")
                .or_else(|_| fs::read_to_string("/etc/hostname"))
                .ok()
        })
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "pbx".into())
}

/// Truncates a file after its last newline, dropping a record that a crash
/// cut short so that every line readers see is whole JSON.
pub fn repair_torn_tail(path: &Path) -> Result<(), CdrError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(CdrError::io(path))?;
    let len = file.metadata().map_err(CdrError::io(path))?.len();
    let keep = last_newline_end(&mut file, len).map_err(CdrError::io(path))?;
    if keep != len {
        tracing::warn!(path = %path.display(), dropped_bytes = len - keep, "cdr: repairing a torn last line");
        file.set_len(keep).map_err(CdrError::io(path))?;
        file.sync_all().map_err(CdrError::io(path))?;
    }
    Ok(())
}

/// The length of the file up to and including its last newline.
fn last_newline_end(file: &mut File, len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let size = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..size])?;
        if let Some(pos) = buf[..size].iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Deletes CDR files (of every pod, so that files of pods scaled away do
/// not pile up) whose day is more than `retention_days` before `today`.
/// Returns the files deleted.
pub fn apply_retention(
    files: &CdrFiles,
    today: NaiveDate,
    retention_days: u32,
) -> Result<Vec<PathBuf>, CdrError> {
    let Some(oldest_kept) = today.checked_sub_days(Days::new(u64::from(retention_days))) else {
        return Ok(Vec::new());
    };
    let mut deleted = Vec::new();
    for (path, date, _) in files.list()? {
        if date >= oldest_kept {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => deleted.push(path),
            // Another pod applying the same retention got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CdrError::io(&path)(e)),
        }
    }
    if !deleted.is_empty() {
        tracing::info!(count = deleted.len(), "cdr: deleted files past retention");
    }
    Ok(deleted)
}
