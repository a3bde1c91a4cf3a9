use std::net::SocketAddr;
use std::sync::Arc;

use super::store::{MemoryStore, Store};
use super::*;
use crate::config::UserConfig;
use crate::sip::parse::parse_datagram;

const LIMITS: Limits = Limits {
    min_expires: 60,
    max_expires: 3600,
};

fn register(contacts: &[&str], expires: Option<u32>, call_id: &str, cseq: u32) -> Message {
    let contacts: String = contacts
        .iter()
        .map(|c| format!("Contact: {c}\r\n"))
        .collect();
    let expires = expires
        .map(|e| format!("Expires: {e}\r\n"))
        .unwrap_or_default();
    let text = format!(
        "REGISTER sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK{cseq}\r\n\
         From: <sip:1001@pbx.local>;tag=1\r\nTo: <sip:1001@pbx.local>\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\nMax-Forwards: 70\r\n{contacts}{expires}Content-Length: 0\r\n\r\n"
    );
    parse_datagram(text.as_bytes()).expect("parses").message
}

fn registrar(instance: &str, store: Arc<dyn Store>) -> Registrar {
    let users = [UserConfig {
        username: "1001".into(),
        password: Some("pw".into()),
        ..UserConfig::default()
    }];
    Registrar::new(
        store,
        Directory::load("pbx.local", &users, None).expect("users"),
        instance.parse().expect("instance"),
        Protocol::Udp,
        EventBus::default(),
        Arc::new(PbxStatus::default()),
    )
}

fn phone() -> Peer {
    Peer {
        addr: "203.0.113.9:40000".parse().expect("addr"),
        protocol: Protocol::Udp,
    }
}

#[test]
fn expires_are_clamped_and_too_brief_is_423() {
    let r = parse(
        &register(&["<sip:a@10.0.0.1>;expires=9999"], None, "c", 1),
        LIMITS,
    )
    .expect("ok");
    assert_eq!(r.update, Update::Set(vec![("sip:a@10.0.0.1".into(), 3600)]));
    let refusal =
        parse(&register(&["<sip:a@10.0.0.1>"], Some(30), "c", 1), LIMITS).expect_err("too brief");
    assert_eq!(refusal.code, 423);
    assert_eq!(refusal.headers, vec![("Min-Expires", "60".to_string())]);
    let r = parse(&register(&["*"], Some(0), "c", 1), LIMITS).expect("ok");
    assert_eq!(r.update, Update::RemoveAll);
    assert_eq!(
        parse(&register(&["*"], Some(5), "c", 1), LIMITS).map_err(|r| r.code),
        Err(400)
    );
    let r = parse(&register(&[], None, "c", 1), LIMITS).expect("ok");
    assert_eq!(r.update, Update::Query);
}

#[tokio::test]
async fn add_refresh_remove_and_out_of_order() {
    let reg = registrar("192.0.2.1:5060", Arc::new(MemoryStore::default()));
    let add = |contacts: &[&str], expires, cseq| {
        parse(&register(contacts, expires, "call-1", cseq), LIMITS).expect("valid")
    };
    let b = reg
        .register(
            add(
                &["<sip:1001@10.0.0.5:5062>", "<sip:1001@10.0.0.6>"],
                Some(120),
                1,
            ),
            phone(),
        )
        .await
        .expect("added");
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].source, phone().addr);
    assert!(matches!(
        reg.register(add(&["<sip:1001@10.0.0.6>"], Some(120), 1), phone())
            .await,
        Err(RegisterError::OutOfOrder)
    ));
    let b = reg
        .register(add(&["<sip:1001@10.0.0.6>"], Some(0), 2), phone())
        .await
        .expect("removed one");
    assert_eq!(b.len(), 1);
    let Lookup::Contacts(targets) = reg.lookup("1001", false).await else {
        panic!("registered");
    };
    assert_eq!(targets[0].uri.to_string(), "sip:1001@10.0.0.5:5062");
    assert_eq!(targets[0].peer, phone(), "calls go to the NAT flow");
    let b = reg
        .register(add(&["*"], Some(0), 3), phone())
        .await
        .expect("removed all");
    assert!(b.is_empty());
    assert_eq!(reg.lookup("1001", false).await, Lookup::NotRegistered);
    assert_eq!(reg.lookup("nobody", false).await, Lookup::Unknown);
}

#[tokio::test]
async fn another_instance_is_the_next_hop_for_its_bindings() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let a = registrar("192.0.2.1:5060", Arc::clone(&store));
    let b = registrar("192.0.2.2:5070", store);
    let request = parse(
        &register(&["<sip:1001@10.0.0.5>"], Some(120), "c", 1),
        LIMITS,
    )
    .expect("valid");
    a.register(request, phone()).await.expect("added");
    let Lookup::Contacts(targets) = b.lookup("1001", false).await else {
        panic!("registered");
    };
    let hop: SocketAddr = "192.0.2.2:5070".parse().expect("addr");
    assert_ne!(targets[0].peer.addr, hop);
    assert_eq!(
        targets[0].peer.addr,
        "192.0.2.1:5060".parse().expect("addr")
    );
    assert_eq!(
        targets[0].uri.to_string(),
        "sip:1001@192.0.2.1:5060;pbx-local"
    );
    assert_eq!(b.lookup("1001", true).await, Lookup::NotRegistered);
}

#[tokio::test]
async fn lapsed_bindings_are_swept() {
    let store = MemoryStore::default();
    let mut binding = Binding {
        contact: "sip:a@10.0.0.1".into(),
        expires_at: 100,
        call_id: "c".into(),
        cseq: 1,
        source: phone().addr,
        transport: "udp".into(),
        instance: "192.0.2.1:5060".into(),
    };
    store
        .put("1001", vec![binding.clone()], Vec::new())
        .await
        .expect("put");
    binding.contact = "sip:b@10.0.0.1".into();
    binding.expires_at = 200;
    store
        .put("1001", vec![binding], Vec::new())
        .await
        .expect("put");
    let swept = store.sweep(150).await.expect("sweep");
    assert_eq!(swept.live, 1);
    assert_eq!(swept.expired.len(), 1);
    assert_eq!(swept.expired[0].1.contact, "sip:a@10.0.0.1");
}
