//! The process's open-file limit. Every media port is a socket, so a full
//! port pool needs as many descriptors as it has ports, well above the
//! soft limit of 1,024 that systemd, and containerd 2 after it, give a
//! process; their hard limit (524,288) leaves raising the soft one to the
//! program. The PBX raises it to the hard limit at start, as servers do,
//! and says so when that is still short of what its configuration needs.

use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a lasting shortage of descriptors is reported.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// The soft and hard open-file limits.
fn open_file_limits() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is live for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// How many files the process may have open (the soft limit).
pub fn open_files() -> usize {
    open_file_limits().map_or(0, |l| usize::try_from(l.rlim_cur).unwrap_or(usize::MAX))
}

/// Raises the soft open-file limit to the hard one; returns the limit
/// before and after.
pub fn raise_open_files() -> io::Result<(u64, u64)> {
    let mut limit = open_file_limits()?;
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is live for the call; raising the soft limit up
        // to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// Whether `error` means the process, or the system, has no descriptor left.
pub fn out_of_files(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Reports running out of descriptors at most once a minute: the shortage
/// lasts, and whatever met it is retried far more often than that.
#[derive(Debug, Default)]
pub struct OutOfFilesReport {
    last: Mutex<Option<Instant>>,
}

impl OutOfFilesReport {
    /// Reports `error`, and `consequence` for the user, unless reported in
    /// the last minute.
    pub fn report(&self, error: &io::Error, consequence: &str) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                error = %error,
                limit = open_files(),
                "no file descriptors left: {consequence}; raise the open-file limit (ulimit -n, systemd LimitNOFILE=, the container runtime's nofile)"
            );
        }
    }
}
