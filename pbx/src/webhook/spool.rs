//! The on-disk spool of one webhook endpoint: one file per event, named by
//! a sequence number so that a directory listing restores the order.
//! Files are written to a temporary name, fsynced and renamed, so a crash
//! leaves either the whole event or nothing.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// An event waiting for delivery to one endpoint.
#[derive(Debug, Clone)]
pub enum Item {
    /// Safely on disk; removed once delivered.
    Spooled(PathBuf),
    /// The spool could not take it (disk full); delivered from memory and
    /// lost on a restart.
    InMemory(Arc<[u8]>),
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    next_seq: u64,
}

const SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".tmp";

impl Spool {
    /// The spool of `url` under `root`, with the events left in it by an
    /// earlier run, oldest first.
    pub fn open(root: &Path, url: &str) -> io::Result<(Self, Vec<Item>)> {
        let key = hex::encode(Sha256::digest(url.as_bytes()));
        let dir = root.join(&key[..16]);
        fs::create_dir_all(&dir)?;
        // Lets a person find which receiver a directory belongs to; only
        // informative, so a full disk must not stop start-up over it.
        if let Err(e) = fs::write(dir.join("endpoint.url"), url) {
            tracing::warn!(dir = %dir.display(), error = %e, "webhook: cannot label the spool directory");
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) {
                // A write that a crash interrupted before its rename.
                let _ = fs::remove_file(entry.path());
            } else if let Some(seq) = name
                .strip_suffix(SUFFIX)
                .and_then(|s| s.parse::<u64>().ok())
            {
                found.push((seq, entry.path()));
            }
        }
        found.sort();
        let next_seq = found.last().map_or(0, |(seq, _)| seq + 1);
        let items = found
            .into_iter()
            .map(|(_, path)| Item::Spooled(path))
            .collect();
        Ok((Self { dir, next_seq }, items))
    }

    fn write_one(&mut self, body: &[u8]) -> io::Result<PathBuf> {
        let name = format!("{:020}{SUFFIX}", self.next_seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let written = (|| {
            fs::create_dir_all(&self.dir)?;
            let mut file = File::create(&tmp)?;
            file.write_all(body)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.next_seq += 1;
        Ok(path)
    }

    /// Appends events in order; each one the disk refuses is kept in memory.
    pub fn append_all(&mut self, bodies: &[Arc<[u8]>]) -> (Vec<Item>, Option<io::Error>) {
        let mut first_error = None;
        let items = bodies
            .iter()
            .map(|body| match self.write_one(body) {
                Ok(path) => Item::Spooled(path),
                Err(e) => {
                    first_error.get_or_insert(e);
                    Item::InMemory(Arc::clone(body))
                }
            })
            .collect();
        // One directory sync makes every rename of the batch durable.
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            first_error.get_or_insert(e);
        }
        (items, first_error)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
