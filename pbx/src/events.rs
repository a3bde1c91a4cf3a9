//! The call-event stream: what happens to calls and registrations, published
//! once by the B2BUA and registrar and delivered to every observer (CDR
//! writer, webhook dispatcher, metrics) in order, none of them lossy.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The parties of a call as the caller's INVITE named them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallParties {
    /// The A leg's Call-ID: the call's identity towards the caller.
    pub call_id: String,
    /// From URI of the caller's INVITE.
    pub caller: String,
    /// Request-URI user (or URI) the caller dialled.
    pub callee: String,
}

/// How a call ended, for billing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    Answered,
    Busy,
    NoAnswer,
    Cancelled,
    Failed,
    Rejected,
}

/// Why an answered call ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    CallerBye,
    CalleeBye,
    RtpTimeout,
    Drain,
    Error,
}

/// Everything the CDR needs, known when the call has ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallSummary {
    pub start_time: DateTime<Utc>,
    pub answer_time: Option<DateTime<Utc>>,
    pub end_time: DateTime<Utc>,
    /// Seconds from answer to end; 0 for calls never answered.
    pub duration: f64,
    pub disposition: Disposition,
    /// Final response code the caller got (200 for answered calls).
    pub sip_code: u16,
    pub end_reason: Option<EndReason>,
    /// First codec of the SDP answer, e.g. "PCMU".
    pub codec: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    CallStarted {
        call: CallParties,
    },
    CallRinging {
        call: CallParties,
        code: u16,
    },
    CallAnswered {
        call: CallParties,
        codec: Option<String>,
    },
    CallEnded {
        call: CallParties,
        summary: CallSummary,
    },
    RegistrationCreated {
        aor: String,
        contact: String,
        expires: u32,
        source: String,
    },
    RegistrationExpired {
        aor: String,
        contact: String,
    },
}

impl Event {
    /// The webhook `type` of this event.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::CallStarted { .. } => "call.started",
            Event::CallRinging { .. } => "call.ringing",
            Event::CallAnswered { .. } => "call.answered",
            Event::CallEnded { .. } => "call.ended",
            Event::RegistrationCreated { .. } => "registration.created",
            Event::RegistrationExpired { .. } => "registration.expired",
        }
    }
}

/// One published event with its identity (the webhook idempotency key).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    pub event: Event,
}

pub type Subscription = mpsc::UnboundedReceiver<Arc<Envelope>>;

/// Fan-out of events to every subscriber. Unbounded per subscriber so that
/// publishing never blocks call handling; each observer drains its queue
/// promptly (the webhook dispatcher spools to disk rather than hold events).
#[derive(Debug, Default, Clone)]
pub struct EventBus {
    subscribers: Vec<mpsc::UnboundedSender<Arc<Envelope>>>,
}

impl EventBus {
    pub fn subscribe(&mut self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(tx);
        rx
    }

    pub fn publish(&self, event: Event) {
        let envelope = Arc::new(Envelope {
            id: uuid::Uuid::new_v4().to_string(),
            timestamp: Utc::now(),
            event,
        });
        for subscriber in &self.subscribers {
            // A subscriber that has gone away (shutdown) is not an error.
            let _ = subscriber.send(Arc::clone(&envelope));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_subscriber_gets_every_event_in_order() {
        let mut bus = EventBus::default();
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        let call = CallParties {
            call_id: "c1".into(),
            caller: "sip:1001@pbx".into(),
            callee: "1002".into(),
        };
        bus.publish(Event::CallStarted { call: call.clone() });
        bus.publish(Event::CallRinging { call, code: 180 });
        for rx in [&mut a, &mut b] {
            let first = rx.recv().await.expect("first");
            let second = rx.recv().await.expect("second");
            assert_eq!(first.event.type_name(), "call.started");
            assert_eq!(second.event.type_name(), "call.ringing");
            assert_ne!(first.id, second.id);
        }
    }
}
