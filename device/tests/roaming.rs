//! Endpoint roaming: the peer's source address changes while traffic flows, and the device
//! follows it from the first authenticated packet.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn traffic_follows_a_peer_whose_source_address_changes() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    assert!(link.a.ping(&b.inner4, 3));
    let old = format!("{}:{}", link.b_addr, b.port);
    assert_eq!(dump(&link.a, &a.dev.iface)[0].endpoint, old);

    // A stream from b to a that outlives the move.
    let _server = IperfServer::start(&link.a, 5201);
    let mut stream = link
        .b
        .cmd("iperf3")
        .args(["-c", &a.inner4, "-p", "5201", "-t", "8", "-J"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the stream to start", Duration::from_secs(5), || {
        dump(&link.a, &a.dev.iface)[0].rx > 1_000_000
    });

    // b moves: a new address, its route now prefers it as the source, the old one goes away
    // (keeping the new one, which the kernel would otherwise drop with the primary).
    let new_addr = "192.168.50.3";
    run(link.b.cmd("sysctl").args([
        "-qw",
        &format!("net.ipv4.conf.{}.promote_secondaries=1", link.b_dev),
    ]));
    link.b
        .ip(&["addr", "add", &format!("{new_addr}/24"), "dev", &link.b_dev]);
    link.b.ip(&[
        "route",
        "replace",
        "192.168.50.0/24",
        "dev",
        &link.b_dev,
        "src",
        new_addr,
    ]);
    let new = format!("{new_addr}:{}", b.port);
    wait_until(
        "a to follow b to its new address",
        Duration::from_secs(5),
        || dump(&link.a, &a.dev.iface)[0].endpoint == new,
    );
    link.b.ip(&[
        "addr",
        "del",
        &format!("{}/24", link.b_addr),
        "dev",
        &link.b_dev,
    ]);

    // The stream finishes, still moving data after the move.
    wait_until("the stream to end", Duration::from_secs(30), || {
        !matches!(stream.try_wait(), Ok(None))
    });
    let out = stream.wait_with_output().unwrap();
    assert!(out.status.success(), "iperf3 failed across the move");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let intervals = v["intervals"].as_array().unwrap();
    let last = &intervals[intervals.len() - 1]["sum"]["bits_per_second"];
    assert!(
        last.as_f64().unwrap() > 1e6,
        "no traffic at the end of the stream: {last}"
    );

    // And a reaches b only through the new address now.
    assert!(
        link.a.ping(&b.inner4, 3),
        "ping a -> b after the move failed"
    );
    assert_eq!(dump(&link.a, &a.dev.iface)[0].endpoint, new);
}
