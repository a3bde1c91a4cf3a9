//! Helpers shared by the observers' tests: scratch directories, sample
//! events, a settable clock and polling with a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::cdr::Clock;
use crate::events::{CallParties, CallSummary, Disposition, EndReason, Event};

/// A directory removed when the test ends.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sip-pbx-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A clock the test moves by hand.
pub struct FixedClock(Mutex<DateTime<Utc>>);

impl FixedClock {
    pub fn at(now: DateTime<Utc>) -> Self {
        Self(Mutex::new(now))
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().expect("clock lock") = now;
    }
}

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock")
    }
}

pub fn utc(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, s)
        .single()
        .expect("valid time")
}

pub fn parties(call_id: &str) -> CallParties {
    CallParties {
        call_id: call_id.into(),
        caller: "sip:1001@pbx.local".into(),
        callee: "1002".into(),
    }
}

/// An answered call of `seconds` that ended at `end` by the caller's BYE.
pub fn answered(call_id: &str, end: DateTime<Utc>, seconds: i64) -> Event {
    let answer = end - chrono::Duration::seconds(seconds);
    Event::CallEnded {
        call: parties(call_id),
        summary: CallSummary {
            start_time: answer - chrono::Duration::seconds(3),
            answer_time: Some(answer),
            end_time: end,
            duration: seconds as f64,
            disposition: Disposition::Answered,
            sip_code: 200,
            end_reason: Some(EndReason::CallerBye),
            codec: Some("PCMU".into()),
        },
    }
}

/// A call the callee was busy for.
pub fn busy(call_id: &str, end: DateTime<Utc>) -> Event {
    Event::CallEnded {
        call: parties(call_id),
        summary: CallSummary {
            start_time: end - chrono::Duration::seconds(2),
            answer_time: None,
            end_time: end,
            duration: 0.0,
            disposition: Disposition::Busy,
            sip_code: 486,
            end_reason: None,
            codec: None,
        },
    }
}

/// Polls `check` until it returns `Some`, failing the test after `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
