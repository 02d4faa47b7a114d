//! Smoke test of the test helpers and the TCP path.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;

#[test]
fn ipv6_client_reaches_ipv4_backend() {
    let backend = echo_server("127.0.0.1:0");
    let relay = Relay::start(|p| argv([&format!("[::]:{}={backend}", p.pick())]));
    let mut c = connect(&format!("[::1]:{}", relay.port()));
    let data = pattern(1, 100_000);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, data, "relay log:\n{}", relay.log());
}
