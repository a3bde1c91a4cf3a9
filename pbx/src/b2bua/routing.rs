//! Where a new call goes: the callee's registered contacts (through the
//! `Locator` the registrar provides), else the first matching static route
//! of `routes:`, else nowhere (404). Also resolves a target URI to the
//! address and transport to send to.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use regex::Regex;

use crate::config::RouteConfig;
use crate::sip::transport::{Peer, Protocol};
use crate::sip::uri::{Host, SipUri, Uri};

/// One place to send the B leg's INVITE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Request-URI of the B leg.
    pub uri: SipUri,
    /// Where the INVITE goes (the phone's NAT flow for registered phones).
    pub peer: Peer,
    /// Whether the target is a registered contact (To keeps the dialled
    /// AOR) or a static route (To names the target).
    pub registered: bool,
}

/// What the registrar knows of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Contacts(Vec<Target>),
    /// An account exists but has no binding now (480).
    NotRegistered,
    Unknown,
}

/// The registrar as routing sees it.
pub trait Locator: Send + Sync {
    /// The targets of `user`; with `local_only`, only the bindings whose
    /// flow this instance holds (a call handed over by another instance).
    fn lookup<'a>(&'a self, user: &'a str, local_only: bool) -> BoxFuture<'a, Lookup>;
}

/// For a PBX without registrations: nobody is registered.
pub struct NoRegistrations;

impl Locator for NoRegistrations {
    fn lookup<'a>(&'a self, _user: &'a str, _local_only: bool) -> BoxFuture<'a, Lookup> {
        Box::pin(async { Lookup::Unknown })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOutcome {
    Targets(Vec<Target>),
    /// Final response for the caller: 404, 480, 503...
    Reject(u16),
}

struct StaticRoute {
    pattern: Regex,
    target: String,
}

pub struct Router {
    routes: Vec<StaticRoute>,
    locator: Arc<dyn Locator>,
    default_protocol: Protocol,
}

impl Router {
    /// Routes were validated with the config; a bad regex here is skipped.
    pub fn new(
        routes: &[RouteConfig],
        locator: Arc<dyn Locator>,
        default_protocol: Protocol,
    ) -> Self {
        let routes = routes
            .iter()
            .filter_map(|r| {
                Regex::new(&r.pattern).ok().map(|pattern| StaticRoute {
                    pattern,
                    target: r.target.clone(),
                })
            })
            .collect();
        Self {
            routes,
            locator,
            default_protocol,
        }
    }

    /// Routes a call to `user` (the Request-URI user, unescaped); a call
    /// handed over by another instance (`local_only`) goes to this
    /// instance's bindings only, never to static routes.
    pub async fn route(&self, user: &str, local_only: bool) -> RouteOutcome {
        let registered = match self.locator.lookup(user, local_only).await {
            Lookup::Contacts(targets) if !targets.is_empty() => {
                return RouteOutcome::Targets(targets)
            }
            Lookup::Contacts(_) | Lookup::NotRegistered => true,
            Lookup::Unknown => false,
        };
        if local_only {
            return RouteOutcome::Reject(480);
        }
        if let Some(uri) = self.static_target(user) {
            return match resolve(&uri, self.default_protocol).await {
                Some(peer) => RouteOutcome::Targets(vec![Target {
                    uri,
                    peer,
                    registered: false,
                }]),
                None => RouteOutcome::Reject(503),
            };
        }
        RouteOutcome::Reject(if registered { 480 } else { 404 })
    }

    /// The first static route matching `user`, with captures substituted.
    pub fn static_target(&self, user: &str) -> Option<SipUri> {
        self.routes.iter().find_map(|route| {
            let caps = route.pattern.captures(user)?;
            let mut expanded = String::new();
            caps.expand(&route.target, &mut expanded);
            match Uri::parse(&expanded) {
                Ok(Uri::Sip(uri)) => Some(uri),
                _ => {
                    tracing::warn!(target = %expanded, "static route produced an invalid URI");
                    None
                }
            }
        })
    }
}

/// The address and transport for a SIP URI (RFC 3263 reduced to A/AAAA
/// lookups: `;transport=` or the default, port or 5060).
pub async fn resolve(uri: &SipUri, default: Protocol) -> Option<Peer> {
    let protocol = match uri.param("transport").and_then(|p| p.value.as_deref()) {
        Some(t) if t.eq_ignore_ascii_case("tcp") => Protocol::Tcp,
        Some(t) if t.eq_ignore_ascii_case("udp") => Protocol::Udp,
        _ => default,
    };
    let port = uri.port.unwrap_or(5060);
    let addr = match &uri.host {
        Host::Ip(ip) => SocketAddr::new(*ip, port),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .ok()?
            .next()?,
    };
    Some(Peer { addr, protocol })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        let routes: Vec<RouteConfig> = routes
            .iter()
            .map(|(m, t)| RouteConfig {
                pattern: m.to_string(),
                target: t.to_string(),
            })
            .collect();
        Router::new(&routes, Arc::new(NoRegistrations), Protocol::Udp)
    }

    #[tokio::test]
    async fn first_matching_route_with_captures() {
        let r = router(&[
            ("^9(\\d+)$", "sip:$1@127.0.0.1:5080"),
            ("^(\\d+)$", "sip:$1@127.0.0.2:5080;transport=tcp"),
        ]);
        let RouteOutcome::Targets(t) = r.route("9555", false).await else {
            panic!("routed");
        };
        assert_eq!(t[0].uri.to_string(), "sip:555@127.0.0.1:5080");
        assert_eq!(t[0].peer.addr, "127.0.0.1:5080".parse().unwrap());
        let RouteOutcome::Targets(t) = r.route("555", false).await else {
            panic!("routed");
        };
        assert_eq!(t[0].peer.protocol, Protocol::Tcp);
        assert_eq!(r.route("alice", false).await, RouteOutcome::Reject(404));
    }
}
