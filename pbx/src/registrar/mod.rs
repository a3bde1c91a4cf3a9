//! The registrar (RFC 3261 §10): REGISTER adds, refreshes, removes and
//! queries the contacts of an address of record (the To user), with
//! `expires` clamped to `registrar.min_expires`/`max_expires`; each binding
//! keeps the flow it arrived on (source address, transport) and the PBX
//! instance holding that flow. Bindings live in a `Store` (memory or
//! Redis), are swept when they lapse (`registration.expired`), and routing
//! finds them through the `Locator` impl.

pub mod redis;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use self::store::{Binding, Store, StoreError};
use crate::auth::users::Directory;
use crate::b2bua::checks::Refusal;
use crate::b2bua::routing::{Locator, Lookup, Target};
use crate::events::{Event, EventBus};
use crate::sip::message::{Message, Method};
use crate::sip::transport::{Peer, Protocol};
use crate::sip::uri::{Host, NameAddr, Param, SipUri, Uri};
use crate::status::PbxStatus;

/// Request-URI parameter of an INVITE one PBX instance sends another for a
/// phone whose flow the other holds: route to local bindings only.
pub const LOCAL_PARAM: &str = "pbx-local";

/// How often lapsed bindings are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// `registrar:` limits on `expires`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_expires: u32,
    pub max_expires: u32,
}

/// What a REGISTER asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// No Contact: list the bindings.
    Query,
    /// `Contact: *` with `Expires: 0`.
    RemoveAll,
    /// Contacts with their granted expires (0 removes).
    Set(Vec<(String, u32)>),
}

/// A REGISTER checked and ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub aor: String,
    pub update: Update,
    pub call_id: String,
    pub cseq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// RFC 3261 §10.3 step 7: a request older than the binding.
    #[error("REGISTER out of order for a binding (same Call-ID, CSeq not higher)")]
    OutOfOrder,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a REGISTER: the AOR, the contacts and their expires.
pub fn parse(request: &Message, limits: Limits) -> Result<Registration, Refusal> {
    let refuse = |code: u16| Refusal {
        code,
        headers: Vec::new(),
    };
    // An AOR that is no SIP URI with a user (RFC 4475 unksm2: `isbn:`) is
    // not valid for this domain: 404 (RFC 3261 §10.3 step 3).
    let aor = request
        .to()
        .and_then(|to| to.uri.sip().and_then(SipUri::user_unescaped))
        .filter(|u| !u.is_empty())
        .ok_or_else(|| refuse(404))?;
    let (Some(call_id), Some(cseq)) = (request.call_id(), request.cseq()) else {
        return Err(refuse(400));
    };
    let header_expires = match request.headers.get("Expires") {
        Some(v) => Some(v.trim().parse::<u32>().map_err(|_| refuse(400))?),
        None => None,
    };
    let contacts: Vec<&str> = request.headers.get_all("Contact").collect();
    let update = if contacts.iter().any(|c| c.trim() == "*") {
        if contacts.len() != 1 || header_expires != Some(0) {
            return Err(refuse(400));
        }
        Update::RemoveAll
    } else if contacts.is_empty() {
        Update::Query
    } else {
        let mut set = Vec::with_capacity(contacts.len());
        for value in contacts {
            let contact = NameAddr::parse(value).map_err(|_| refuse(400))?;
            let asked = match contact.param("expires") {
                Some(e) => e.parse::<u32>().map_err(|_| refuse(400))?,
                None => header_expires.unwrap_or(limits.max_expires),
            };
            if asked != 0 && asked < limits.min_expires {
                return Err(Refusal {
                    code: 423,
                    headers: vec![("Min-Expires", limits.min_expires.to_string())],
                });
            }
            set.push((contact.uri.to_string(), asked.min(limits.max_expires)));
        }
        Update::Set(set)
    };
    Ok(Registration {
        aor,
        update,
        call_id: call_id.to_string(),
        cseq: cseq.seq,
    })
}

/// The 200 to a REGISTER: every current binding with its remaining time.
pub fn ok_response(request: &Message, bindings: &[Binding], to_tag: &str) -> Message {
    let now = unix_now();
    let mut response = Message::response_to(request, 200, Some(to_tag));
    for b in bindings {
        let left = remaining(b.expires_at, now);
        response
            .headers
            .push("Contact", format!("<{}>;expires={left}", b.contact));
    }
    response
}

/// The registrar: bindings in a store, the events they cause, and the
/// lookups routing makes.
pub struct Registrar {
    store: Arc<dyn Store>,
    directory: Directory,
    /// This instance's SIP address ("ip:port"), recorded in its bindings.
    instance: String,
    /// Transport other instances are reached on.
    instance_protocol: Protocol,
    bus: EventBus,
    status: Arc<PbxStatus>,
}

impl Registrar {
    pub fn new(
        store: Arc<dyn Store>,
        directory: Directory,
        instance: SocketAddr,
        instance_protocol: Protocol,
        bus: EventBus,
        status: Arc<PbxStatus>,
    ) -> Self {
        Self {
            store,
            directory,
            instance: instance.to_string(),
            instance_protocol,
            bus,
            status,
        }
    }

    /// Applies a REGISTER that arrived from `source`; returns the bindings
    /// of the AOR afterwards.
    pub async fn register(
        &self,
        registration: Registration,
        source: Peer,
    ) -> Result<Vec<Binding>, RegisterError> {
        let now = unix_now();
        let Registration {
            aor,
            update,
            call_id,
            cseq,
        } = registration;
        let mut current: Vec<Binding> = self.store.get(&aor).await?;
        current.retain(|b| b.expires_at > now);
        let in_order = |b: &Binding| b.call_id != call_id || b.cseq < cseq;
        let (upserts, removals) = match update {
            Update::Query => return Ok(current),
            Update::RemoveAll => {
                if !current.iter().all(in_order) {
                    return Err(RegisterError::OutOfOrder);
                }
                let all = current.iter().map(|b| b.contact.clone()).collect();
                (Vec::new(), all)
            }
            Update::Set(contacts) => {
                let mut upserts = Vec::new();
                let mut removals = Vec::new();
                for (contact, expires) in contacts {
                    if let Some(old) = current.iter().find(|b| b.contact == contact) {
                        if !in_order(old) {
                            return Err(RegisterError::OutOfOrder);
                        }
                    }
                    if expires == 0 {
                        removals.push(contact);
                    } else {
                        upserts.push(Binding {
                            contact,
                            // Counted from the next whole second: never early.
                            expires_at: now + GRACE + u64::from(expires),
                            call_id: call_id.clone(),
                            cseq,
                            source: source.addr,
                            transport: match source.protocol {
                                Protocol::Udp => "udp".into(),
                                Protocol::Tcp => "tcp".into(),
                            },
                            instance: self.instance.clone(),
                        });
                    }
                }
                (upserts, removals)
            }
        };
        let created: Vec<Binding> = upserts
            .iter()
            .filter(|u| !current.iter().any(|b| b.contact == u.contact))
            .cloned()
            .collect();
        self.store
            .put(&aor, upserts.clone(), removals.clone())
            .await?;
        current.retain(|b| {
            !removals.contains(&b.contact) && !upserts.iter().any(|u| u.contact == b.contact)
        });
        current.extend(upserts);
        for b in created {
            self.bus.publish(Event::RegistrationCreated {
                aor: aor.clone(),
                contact: b.contact,
                expires: u32::try_from(remaining(b.expires_at, now)).unwrap_or(u32::MAX),
                source: source.to_string(),
            });
        }
        Ok(current)
    }

    /// Sweeps lapsed bindings every second for as long as the runtime runs:
    /// `registration.expired` for each, and the live count for the status.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let registrar = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                match registrar.store.sweep(unix_now()).await {
                    Ok(swept) => {
                        registrar
                            .status
                            .registrations
                            .store(swept.live, Ordering::Relaxed);
                        for (aor, b) in swept.expired {
                            tracing::info!(aor, contact = %b.contact, "registration expired");
                            registrar.bus.publish(Event::RegistrationExpired {
                                aor,
                                contact: b.contact,
                            });
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "registration sweep skipped"),
                }
            }
        });
    }

    /// Where a binding is reached from this instance: the phone's own flow
    /// when this instance holds it, else the instance that does.
    fn target(&self, aor: &str, binding: &Binding) -> Option<Target> {
        if binding.instance == self.instance {
            let Ok(Uri::Sip(uri)) = Uri::parse(&binding.contact) else {
                return None;
            };
            let protocol = if binding.transport == "tcp" {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            return Some(Target {
                uri,
                peer: Peer {
                    addr: binding.source,
                    protocol,
                },
                registered: true,
            });
        }
        let addr: SocketAddr = binding.instance.parse().ok()?;
        let mut uri = SipUri::new(Some(aor), Host::Ip(addr.ip()), Some(addr.port()));
        uri.params.push(Param {
            name: LOCAL_PARAM.into(),
            value: None,
        });
        Some(Target {
            uri,
            peer: Peer {
                addr,
                protocol: self.instance_protocol,
            },
            registered: true,
        })
    }
}

impl Locator for Registrar {
    fn lookup<'a>(&'a self, user: &'a str, local_only: bool) -> BoxFuture<'a, Lookup> {
        Box::pin(async move {
            let now = unix_now();
            let bindings = match self.store.get(user).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, user, "registrar lookup failed; trying static routes");
                    return Lookup::Unknown;
                }
            };
            let mut targets: Vec<Target> = Vec::new();
            for b in bindings.iter().filter(|b| b.expires_at > now) {
                if local_only && b.instance != self.instance {
                    continue;
                }
                if let Some(t) = self.target(user, b) {
                    // One INVITE per other instance: it forks to its own flows.
                    if !targets.contains(&t) {
                        targets.push(t);
                    }
                }
            }
            if !targets.is_empty() {
                Lookup::Contacts(targets)
            } else if self.directory.contains(user) {
                Lookup::NotRegistered
            } else {
                Lookup::Unknown
            }
        })
    }
}

/// Whether a request is one PBX instance handing another a call for its
/// local bindings.
pub fn is_local_only(request: &Message) -> bool {
    request.method() == Some(&Method::Invite)
        && request
            .request_uri()
            .and_then(Uri::sip)
            .is_some_and(|u| u.param(LOCAL_PARAM).is_some())
}

/// Bindings are kept up to this many seconds past their expiry, as time is
/// counted in whole seconds and a binding must never lapse early.
const GRACE: u64 = 1;

/// Seconds of a binding left, as the phone asked for them.
fn remaining(expires_at: u64, now: u64) -> u64 {
    expires_at.saturating_sub(now + GRACE)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
