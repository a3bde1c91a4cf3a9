//! Registrations shared through a real `redis-server` (started here on a
//! free loopback port): a user registered on one PBX is called through
//! another, which hands the INVITE to the PBX holding the phone's flow; a
//! PBX started afresh sees the bindings; with Redis down REGISTER gets 500
//! while static routes keep working, and registration recovers with Redis.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sip_pbx_e2e::phone::{contacts, Phone};
use sip_pbx_e2e::{assert_sipp_ok, free_port, wait_until, Pbx, Sipp};

/// A `redis-server` without persistence, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (tests/setup.sh installs it)");
        wait_until(Duration::from_secs(10), "redis-server to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Redis { child, port }
    }

    fn config(&self) -> String {
        format!(
            "registrar:\n  store: redis\n  redis_url: \"redis://127.0.0.1:{}\"\n",
            self.port
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn no_routes(redis: &Redis) -> String {
    format!("{}\nroutes: []\n", redis.config())
}

#[test]
fn a_user_registered_on_one_pbx_is_called_through_another() {
    let redis = Redis::start(free_port());
    let holder = Pbx::start(1, &no_routes(&redis));
    let other = Pbx::start(1, &no_routes(&redis));
    let mut phone = Phone::new("1002", holder.sip_addr());
    let phone_addr = phone.client.addr();
    let (code, text) = phone.register(&[
        format!("Contact: <sip:1002@{phone_addr}>"),
        "Expires: 300".into(),
    ]);
    assert_eq!(code, 200, "{text}");
    drop(phone);
    let callee = Sipp::new("uas_answer.xml", phone_addr.port())
        .args(["-m", "1"])
        .spawn(phone_addr.port());
    let caller = Sipp::new("uac_basic.xml", free_port())
        .args(["-m", "1", "-s", "1002"])
        .arg(other.sip_addr().to_string())
        .run();
    assert_sipp_ok(&caller, "caller on the other PBX");
    assert_sipp_ok(
        &callee.finish(Duration::from_secs(30)),
        "phone on the holder",
    );

    // A PBX process started afresh (a restarted pod) sees the binding.
    drop(holder);
    let restarted = Pbx::start(1, &no_routes(&redis));
    let mut query = Phone::new("1002", restarted.sip_addr());
    let (code, text) = query.register(&[]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        contacts(&text),
        vec![format!(
            "<sip:1002@{phone_addr}>;expires={}",
            expires_of(&text)
        )]
    );
}

/// The expires value of the first Contact of a 200 (it counts down).
fn expires_of(text: &str) -> String {
    contacts(text)
        .first()
        .and_then(|c| c.split("expires=").nth(1))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn redis_down_refuses_register_keeps_static_routes_and_recovers() {
    let port = free_port();
    let redis = Redis::start(port);
    let uas_port = free_port();
    let pbx = Pbx::start(uas_port, &redis.config());
    drop(redis);
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let contact = format!("Contact: <sip:1001@{}>", phone.client.addr());
    let (code, text) = phone.register(std::slice::from_ref(&contact));
    assert_eq!(code, 500, "{text}");
    assert!(
        pbx.log().contains("registrar store unavailable"),
        "a clear log line:\n{}",
        pbx.log()
    );

    let callee = Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "1"])
        .spawn(uas_port);
    let caller = Sipp::new("uac_basic.xml", free_port())
        .args(["-m", "1", "-s", "5555"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&caller, "static route with Redis down");
    assert_sipp_ok(&callee.finish(Duration::from_secs(30)), "static callee");

    let _redis = Redis::start(port);
    wait_until(Duration::from_secs(15), "REGISTER to work again", || {
        phone.register(std::slice::from_ref(&contact)).0 == 200
    });
}
