//! The single CDR writer task: file I/O runs on the blocking pool so that a
//! slow volume (fsync on network storage) never stalls the runtime, and
//! records that cannot be written are held and retried every tick.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::files::{apply_retention, pod_name, repair_torn_tail, CdrFiles};
use super::{CdrError, CdrRecord, Clock, RecentCdrs, SystemClock, RECENT_CAPACITY};
use crate::config::CdrConfig;
use crate::events::Subscription;
use crate::metrics::Metrics;
use crate::observers::{on_blocking, stopped};

/// What the configuration does not say about the writer.
#[derive(Clone)]
pub struct CdrWriterOptions {
    /// Inserted in every file name; see [`pod_name`].
    pub pod: String,
    pub clock: Arc<dyn Clock>,
    /// Records held in memory while the disk refuses them; past this the
    /// oldest are dropped, with an error in the log.
    pub max_pending: usize,
    /// How often data is fsynced and held records are retried.
    pub sync_interval: Duration,
}

impl Default for CdrWriterOptions {
    fn default() -> Self {
        Self {
            pod: pod_name(),
            clock: Arc::new(SystemClock),
            max_pending: 100_000,
            sync_interval: Duration::from_secs(1),
        }
    }
}

struct Writer {
    files: CdrFiles,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    retention_days: u32,
    retention_checked: Option<NaiveDate>,
    open: Option<(NaiveDate, File)>,
    dirty: bool,
    pending: VecDeque<CdrRecord>,
    max_pending: usize,
    failing: bool,
    dropped: u64,
}

impl Writer {
    fn fail(&mut self, error: &CdrError) {
        self.metrics.cdr_write_error();
        if !self.failing {
            tracing::error!(%error, held = self.pending.len(), "cdr: cannot write; holding records in memory and retrying");
            self.failing = true;
        }
    }

    fn accept(&mut self, records: Vec<CdrRecord>) {
        for record in records {
            if self.pending.len() >= self.max_pending {
                if let Some(lost) = self.pending.pop_front() {
                    if self.dropped == 0 {
                        tracing::error!(limit = self.max_pending, call_id = %lost.call.call_id, "cdr: too many records held in memory; dropping the oldest");
                    }
                    self.dropped += 1;
                }
            }
            self.pending.push_back(record);
        }
        self.write_pending();
    }

    fn write_pending(&mut self) {
        while let Some(record) = self.pending.front() {
            let line = match serde_json::to_vec(record) {
                Ok(mut line) => {
                    line.push(b'\n');
                    line
                }
                Err(e) => {
                    tracing::error!(error = %e, call_id = %record.call.call_id, "cdr: cannot encode record; skipping it");
                    self.pending.pop_front();
                    continue;
                }
            };
            let date = record.summary.end_time.date_naive();
            if let Err(e) = self.append(date, &line) {
                self.fail(&e);
                return;
            }
            self.pending.pop_front();
        }
        if self.failing {
            tracing::info!(
                dropped = self.dropped,
                "cdr: writing again; held records written"
            );
            self.failing = false;
            self.dropped = 0;
        }
    }

    fn open_file(&self, date: NaiveDate) -> Result<File, CdrError> {
        let path = self.files.path_for(date);
        fs::create_dir_all(self.files.dir()).map_err(CdrError::io(self.files.dir()))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(CdrError::io(&path))?;
        // A failed write may have left half a line behind.
        repair_torn_tail(&path)?;
        Ok(file)
    }

    fn append(&mut self, date: NaiveDate, line: &[u8]) -> Result<(), CdrError> {
        let mut file = match self.open.take() {
            Some((open, file)) if open == date => file,
            other => {
                self.open = other;
                self.sync()?;
                self.open = None;
                self.open_file(date)?
            }
        };
        if let Err(e) = file.write_all(line) {
            // Earlier records of this file still deserve their fsync; the
            // file is then closed, and reopening it repairs whatever part of
            // this line reached it.
            if self.dirty {
                let _ = file.sync_data();
                self.dirty = false;
            }
            return Err(CdrError::io(self.files.path_for(date))(e));
        }
        self.open = Some((date, file));
        self.dirty = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), CdrError> {
        if let (true, Some((date, file))) = (self.dirty, &self.open) {
            file.sync_data()
                .map_err(CdrError::io(self.files.path_for(*date)))?;
        }
        self.dirty = false;
        Ok(())
    }

    fn tick(&mut self) {
        self.write_pending();
        if let Err(e) = self.sync() {
            self.fail(&e);
        }
        let today = self.clock.now().date_naive();
        if self.retention_checked != Some(today) {
            self.retention_checked = Some(today);
            if let Err(e) = apply_retention(&self.files, today, self.retention_days) {
                tracing::warn!(error = %e, "cdr: retention check failed");
            }
        }
    }
}

/// Prepares the CDR directory and starts the writer task. Only a bad
/// `filename_pattern` is an error: an unwritable directory is logged,
/// counted and retried, so that calls go on.
pub fn spawn(
    config: &CdrConfig,
    options: CdrWriterOptions,
    metrics: Metrics,
    events: Subscription,
    shutdown: watch::Receiver<bool>,
) -> Result<(JoinHandle<()>, RecentCdrs), CdrError> {
    let files = CdrFiles::new(&config.output_dir, &config.filename_pattern, &options.pod)?;
    let today = options.clock.now().date_naive();
    let recent = RecentCdrs::default();
    let prepared = fs::create_dir_all(files.dir())
        .map_err(CdrError::io(files.dir()))
        .and_then(|()| files.repair_own())
        .and_then(|()| files.load(today, RECENT_CAPACITY));
    match prepared {
        Ok(records) => records.into_iter().for_each(|r| recent.push(r)),
        Err(e) => {
            metrics.cdr_write_error();
            tracing::error!(error = %e, "cdr: cannot prepare the CDR directory; will retry on each record");
        }
    }
    let mut writer = Writer {
        files,
        metrics,
        clock: options.clock,
        retention_days: config.retention_days,
        retention_checked: None,
        open: None,
        dirty: false,
        pending: VecDeque::new(),
        max_pending: options.max_pending.max(1),
        failing: false,
        dropped: 0,
    };
    writer.tick();
    let task = tokio::spawn(run(
        Arc::new(Mutex::new(writer)),
        events,
        shutdown,
        options.sync_interval,
        recent.clone(),
    ));
    Ok((task, recent))
}

fn take_ready(first: Option<&CdrRecord>, events: &mut Subscription) -> Vec<CdrRecord> {
    let mut records: Vec<CdrRecord> = first.cloned().into_iter().collect();
    while let Ok(envelope) = events.try_recv() {
        records.extend(CdrRecord::from_envelope(&envelope));
    }
    records
}

/// How long a record may wait to be written with others.
const WRITE_BATCH: Duration = Duration::from_millis(100);
/// A batch this large is written at once.
const WRITE_BATCH_RECORDS: usize = 256;

async fn run(
    writer: Arc<Mutex<Writer>>,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
    sync_interval: Duration,
    recent: RecentCdrs,
) {
    let mut tick = tokio::time::interval(sync_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Records wait up to WRITE_BATCH to be written together: one trip to
    // the blocking pool per batch rather than per call, well inside the
    // one second a crash may lose.
    let mut pending: Vec<CdrRecord> = Vec::new();
    let mut write_at: Option<tokio::time::Instant> = None;
    loop {
        let batch_due = async {
            match write_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = events.recv() => {
                let Some(envelope) = received else { break };
                let first = CdrRecord::from_envelope(&envelope);
                let records = take_ready(first.as_ref(), &mut events);
                records.iter().for_each(|r| recent.push(r.clone()));
                pending.extend(records);
                if pending.len() >= WRITE_BATCH_RECORDS {
                    write_at = None;
                    write(&writer, std::mem::take(&mut pending)).await;
                } else if write_at.is_none() && !pending.is_empty() {
                    write_at = Some(tokio::time::Instant::now() + WRITE_BATCH);
                }
            }
            () = batch_due => {
                write_at = None;
                write(&writer, std::mem::take(&mut pending)).await;
            }
            _ = tick.tick() => {
                write_at = None;
                let records = std::mem::take(&mut pending);
                on_blocking(&writer, move |w| {
                    w.accept(records);
                    w.tick();
                })
                .await;
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    // Events published before shutdown still get their records.
    let records = take_ready(None, &mut events);
    records.iter().for_each(|r| recent.push(r.clone()));
    pending.extend(records);
    on_blocking(&writer, move |w| {
        w.accept(pending);
        w.tick();
    })
    .await;
}

async fn write(writer: &Arc<Mutex<Writer>>, records: Vec<CdrRecord>) {
    on_blocking(writer, move |w| w.accept(records)).await;
}
