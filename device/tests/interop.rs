//! wgmesh against the other userspace implementations: Debian's wireguard-go and boringtun-cli
//! 0.7.1, each side initiating the handshake in turn.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Brings up wgmesh in `a` and `other` in `b`, then checks traffic with each side initiating.
fn interop(other: Impl) {
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, other);

    // wgmesh initiates.
    assert!(
        link.a.ping(&b.inner4, 5),
        "wgmesh -> {other:?}: IPv4 ping failed"
    );
    assert!(
        link.a.ping(&b.inner6, 3),
        "wgmesh -> {other:?}: IPv6 ping failed"
    );
    let hs = dump(&link.a, &a.dev.iface)[0].latest_handshake;
    assert!(hs + 60 >= now_epoch(), "wgmesh reports handshake at {hs}");
    let _server = IperfServer::start(&link.b, 5201);
    let bps = iperf(&link.a, &b.inner4, 5201, 2, &[]);
    eprintln!("wgmesh -> {other:?}: {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 10e6);

    // Forget the sessions on both sides; now the other implementation initiates. wgmesh gets
    // no endpoint (it would greet its new peer at once): it learns it from the handshake.
    link.a
        .wg(&["set", &a.dev.iface, "peer", &b.keys.public, "remove"]);
    link.b
        .wg(&["set", &b.dev.iface, "peer", &a.keys.public, "remove"]);
    add_peer(&a, &b, "", None);
    add_peer(&b, &a, &format!("{}:{}", link.a_addr, a.port), None);
    assert!(dump(&link.a, &a.dev.iface)[0].latest_handshake == 0);
    assert!(
        link.b.ping(&a.inner4, 5),
        "{other:?} -> wgmesh: IPv4 ping failed"
    );
    assert!(
        link.b.ping(&a.inner6, 3),
        "{other:?} -> wgmesh: IPv6 ping failed"
    );
    let _server_a = IperfServer::start(&link.a, 5202);
    let bps = iperf(&link.b, &a.inner4, 5202, 2, &[]);
    eprintln!("{other:?} -> wgmesh: {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 10e6);

    let p = &dump(&link.a, &a.dev.iface)[0];
    assert!(
        p.rx > 1_000_000 && p.tx > 0,
        "wgmesh counters rx={} tx={}",
        p.rx,
        p.tx
    );
    assert!(p.latest_handshake + 60 >= now_epoch());
}

#[test]
fn wgmesh_and_wireguard_go() {
    if !privileged() {
        return;
    }
    require_tools(&["wireguard-go"]);
    interop(Impl::WireguardGo);
}

#[test]
fn wgmesh_and_boringtun_cli() {
    if !privileged() {
        return;
    }
    let _ = boringtun_cli();
    interop(Impl::Boringtun);
}
