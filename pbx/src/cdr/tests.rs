use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use tokio::sync::watch;

use super::*;
use crate::config::CdrConfig;
use crate::events::{CallSummary, EventBus};
use crate::metrics::Metrics;
use crate::status::PbxStatus;
use crate::test_support::{answered, busy, eventually, utc, FixedClock, TempDir};

const POD: &str = "pbx-0";

struct Running {
    bus: EventBus,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    recent: RecentCdrs,
    metrics: Metrics,
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.expect("writer ends cleanly");
    }
}

fn config(dir: &Path) -> CdrConfig {
    CdrConfig {
        output_dir: dir.display().to_string(),
        ..CdrConfig::default()
    }
}

fn start(dir: &Path, clock: Arc<FixedClock>) -> Running {
    let mut bus = EventBus::default();
    let metrics = Metrics::new(Arc::new(PbxStatus::default()));
    let (stop, shutdown) = watch::channel(false);
    let options = CdrWriterOptions {
        pod: POD.into(),
        clock,
        max_pending: 100,
        sync_interval: Duration::from_millis(50),
    };
    let (task, recent) = spawn(
        &config(dir),
        options,
        metrics.clone(),
        bus.subscribe(),
        shutdown,
    )
    .expect("writer starts");
    Running {
        bus,
        stop,
        task,
        recent,
        metrics,
    }
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("valid day")
}

fn file_of(dir: &Path, date: NaiveDate) -> std::path::PathBuf {
    CdrFiles::new(dir, "cdr-%Y-%m-%d.jsonl", POD)
        .expect("pattern")
        .path_for(date)
}

/// The records of a file once it holds `count` whole lines.
async fn records_in(path: &Path, count: usize) -> Vec<CdrRecord> {
    eventually(&format!("{count} records in {}", path.display()), 5, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let whole = text.ends_with('\n') && text.lines().count() == count;
        let records = whole.then(|| {
            text.lines()
                .map(|l| serde_json::from_str(l).expect("valid CDR line"))
                .collect()
        });
        async move { records }
    })
    .await
}

/// A CDR directory that cannot be created until the returned file (where
/// its parent should be) is removed; a permission would not stop root.
fn blocked(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let blocker = dir.path().join("volume");
    std::fs::write(&blocker, "not a directory").expect("seed");
    let cdr_dir = blocker.join("cdr");
    (blocker, cdr_dir)
}

fn ids(records: &[CdrRecord]) -> Vec<&str> {
    records.iter().map(|r| r.call.call_id.as_str()).collect()
}

fn summary(event: &Event) -> &CallSummary {
    match event {
        Event::CallEnded { summary, .. } => summary,
        other => panic!("not a call end: {other:?}"),
    }
}

#[test]
fn file_names_carry_the_pod_before_the_extension() {
    let files = CdrFiles::new("/cdr", "cdr-%Y-%m-%d.jsonl", "pbx-0").expect("valid");
    assert_eq!(
        files.path_for(day(2026, 11, 26)),
        Path::new("/cdr/cdr-2026-11-26.pbx-0.jsonl")
    );
    assert_eq!(
        files.date_of("cdr-2026-11-26.pbx-1.jsonl"),
        Some((day(2026, 11, 26), false))
    );
    assert_eq!(files.date_of("notes.txt"), None);
    let odd_pod = CdrFiles::new("/cdr", "cdr-%Y%m%d", "host.example.com").expect("valid");
    assert_eq!(
        odd_pod.path_for(day(2026, 1, 2)),
        Path::new("/cdr/cdr-20260102.host-example-com")
    );
    for bad in [
        "cdr-%Y.jsonl",
        "a/cdr-%Y-%m-%d.jsonl",
        "cdr-%Q-%m-%d.jsonl",
        "",
    ] {
        assert!(CdrFiles::new("/cdr", bad, "p").is_err(), "{bad:?} accepted");
    }
}

#[tokio::test]
async fn records_are_written_with_every_field() {
    let dir = TempDir::new("cdr-fields");
    let end = utc(2026, 11, 26, 10, 0, 0);
    let clock = Arc::new(FixedClock::at(end));
    let running = start(dir.path(), clock);
    let calls = [answered("a1", end, 42), busy("b1", end)];
    for call in &calls {
        running.bus.publish(call.clone());
    }
    let records = records_in(&file_of(dir.path(), end.date_naive()), 2).await;
    for (record, event) in records.iter().zip(&calls) {
        assert_eq!(&record.summary, summary(event));
        assert_eq!(record.call.caller, "sip:1001@pbx.local");
        assert_eq!(record.call.callee, "1002");
    }
    assert_eq!(ids(&records), ["a1", "b1"]);

    let text = std::fs::read_to_string(file_of(dir.path(), end.date_naive())).expect("file");
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    let mut keys: Vec<&str> = first
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "answer_time",
            "call_id",
            "callee",
            "caller",
            "codec",
            "disposition",
            "duration",
            "end_reason",
            "end_time",
            "sip_code",
            "start_time"
        ]
    );
    let end_time = first["end_time"].as_str().expect("string");
    assert!(chrono::DateTime::parse_from_rfc3339(end_time).is_ok());
    assert_eq!(first["disposition"], "answered");
    assert_eq!(first["end_reason"], "caller_bye");

    assert_eq!(
        ids(&running.recent.latest(10)),
        ["b1", "a1"],
        "newest first"
    );
    running.stop().await;
}

#[tokio::test]
async fn files_rotate_at_midnight_utc_and_today_is_reloaded() {
    let dir = TempDir::new("cdr-rotate");
    let before = utc(2026, 11, 26, 23, 59, 59);
    let after = utc(2026, 11, 27, 0, 0, 1);
    let clock = Arc::new(FixedClock::at(before));
    let running = start(dir.path(), Arc::clone(&clock));
    running.bus.publish(answered("late", before, 10));
    running.bus.publish(answered("early", after, 10));
    running.bus.publish(busy("early2", after));
    let old_day = records_in(&file_of(dir.path(), before.date_naive()), 1).await;
    let new_day = records_in(&file_of(dir.path(), after.date_naive()), 2).await;
    assert_eq!(ids(&old_day), ["late"]);
    assert_eq!(ids(&new_day), ["early", "early2"]);
    running.stop().await;

    // A restart the next day shows that day's calls in the recent list.
    clock.set(utc(2026, 11, 27, 8, 0, 0));
    let restarted = start(dir.path(), clock);
    assert_eq!(ids(&restarted.recent.latest(10)), ["early2", "early"]);
    restarted.stop().await;
}

#[tokio::test]
async fn retention_deletes_only_old_cdr_files_at_start_and_daily() {
    let dir = TempDir::new("cdr-retention");
    let today = day(2026, 11, 26);
    let files = CdrFiles::new(dir.path(), "cdr-%Y-%m-%d.jsonl", "pbx-1").expect("pattern");
    let at = |days_ago: u64| files.path_for(today - chrono::Days::new(days_ago));
    for days_ago in [120, 91, 90, 1] {
        std::fs::write(at(days_ago), "").expect("seed file");
    }
    let unrelated = dir.path().join("notes-2020-01-01.txt");
    std::fs::write(&unrelated, "keep").expect("seed file");

    let clock = Arc::new(FixedClock::at(utc(2026, 11, 26, 12, 0, 0)));
    let running = start(dir.path(), Arc::clone(&clock));
    assert!(!at(120).exists() && !at(91).exists(), "past retention");
    assert!(at(90).exists() && at(1).exists() && unrelated.exists());

    clock.set(utc(2026, 11, 27, 0, 0, 5));
    let day_90 = at(90);
    eventually("the daily retention check", 5, || {
        let gone = !day_90.exists();
        async move { gone.then_some(()) }
    })
    .await;
    assert!(at(1).exists() && unrelated.exists());
    running.stop().await;
}

#[tokio::test]
async fn a_torn_last_line_is_repaired_on_start() {
    let dir = TempDir::new("cdr-torn");
    let now = utc(2026, 11, 26, 9, 0, 0);
    let ours = file_of(dir.path(), now.date_naive());
    let good = serde_json::to_string(
        &CdrRecord::from_envelope(&Envelope {
            id: "e".into(),
            timestamp: now,
            event: answered("whole", now, 5),
        })
        .expect("a record"),
    )
    .expect("json");
    std::fs::write(&ours, format!("{good}\n{{\"call_id\":\"torn")).expect("seed");
    let theirs = CdrFiles::new(dir.path(), "cdr-%Y-%m-%d.jsonl", "pbx-9")
        .expect("pattern")
        .path_for(now.date_naive());
    std::fs::write(&theirs, "{\"still\":\"being written").expect("seed");

    let running = start(dir.path(), Arc::new(FixedClock::at(now)));
    assert_eq!(
        std::fs::read_to_string(&ours).expect("file"),
        format!("{good}\n")
    );
    assert_eq!(
        std::fs::read_to_string(&theirs).expect("file"),
        "{\"still\":\"being written",
        "another pod's file is left alone"
    );
    assert_eq!(ids(&running.recent.latest(5)), ["whole"]);
    running.bus.publish(busy("next", now));
    let records = records_in(&ours, 2).await;
    assert_eq!(ids(&records), ["whole", "next"]);
    running.stop().await;
}

#[tokio::test]
async fn an_unwritable_directory_is_counted_and_records_are_retried() {
    let dir = TempDir::new("cdr-unwritable");
    let (blocker, cdr_dir) = blocked(&dir);
    let now = utc(2026, 11, 26, 9, 0, 0);
    let running = start(&cdr_dir, Arc::new(FixedClock::at(now)));
    running.bus.publish(answered("held", now, 7));
    let metrics = running.metrics.clone();
    eventually("a counted write error after the event", 5, || {
        let errors = metrics.cdr_write_errors();
        async move { (errors >= 2).then_some(()) }
    })
    .await;
    assert_eq!(ids(&running.recent.latest(1)), ["held"]);

    std::fs::remove_file(&blocker).expect("unblock");
    let records = records_in(&file_of(&cdr_dir, now.date_naive()), 1).await;
    assert_eq!(ids(&records), ["held"]);
    running.stop().await;
}

#[tokio::test]
async fn records_published_before_shutdown_are_written() {
    let dir = TempDir::new("cdr-shutdown");
    let now = utc(2026, 11, 26, 9, 0, 0);
    let running = start(dir.path(), Arc::new(FixedClock::at(now)));
    for i in 0..20 {
        running.bus.publish(busy(&format!("c{i}"), now));
    }
    running.stop().await;
    let text = std::fs::read_to_string(file_of(dir.path(), now.date_naive())).expect("file");
    assert_eq!(text.lines().count(), 20);
}

#[tokio::test]
async fn held_records_are_bounded_keeping_the_newest() {
    let dir = TempDir::new("cdr-bound");
    let (blocker, cdr_dir) = blocked(&dir);
    let now = utc(2026, 11, 26, 9, 0, 0);
    let running = start(&cdr_dir, Arc::new(FixedClock::at(now)));
    for i in 0..150 {
        running.bus.publish(busy(&format!("c{i}"), now));
    }
    let recent = running.recent.clone();
    eventually("all 150 records received", 5, || {
        let newest = recent.latest(1);
        async move { (ids(&newest) == ["c149"]).then_some(()) }
    })
    .await;
    std::fs::remove_file(&blocker).expect("unblock");
    let records = records_in(&file_of(&cdr_dir, now.date_naive()), 100).await;
    assert_eq!(
        ids(&records[..1]),
        ["c50"],
        "the oldest 50 went over the bound"
    );
    assert_eq!(ids(&records[99..]), ["c149"]);
    running.stop().await;
}
