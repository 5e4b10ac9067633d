//! Two wgmesh devices in two network namespaces, configured with `wg set`, moving real traffic.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;

#[test]
fn two_devices_ping_and_move_data_over_ipv4_and_ipv6() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);

    assert!(
        link.a.ping(&b.inner4, 5),
        "IPv4 ping through the tunnel failed"
    );
    assert!(
        link.a.ping(&b.inner6, 5),
        "IPv6 ping through the tunnel failed"
    );
    assert!(link.b.ping(&a.inner4, 3), "IPv4 ping back failed");

    let _server = IperfServer::start(&link.b, 5201);
    let bps4 = iperf(&link.a, &b.inner4, 5201, 2, &[]);
    let bps6 = iperf(&link.a, &b.inner6, 5201, 2, &["-R"]);
    eprintln!(
        "wgmesh<->wgmesh iperf3: IPv4 {:.0} Mbit/s, IPv6 reverse {:.0} Mbit/s",
        bps4 / 1e6,
        bps6 / 1e6
    );
    assert!(bps4 > 10e6, "IPv4 throughput {bps4} bit/s");
    assert!(bps6 > 10e6, "IPv6 throughput {bps6} bit/s");
}

#[test]
fn wg_show_reports_handshake_transfer_and_endpoint() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    assert!(link.a.ping(&b.inner4, 3));

    let peers = dump(&link.a, &a.dev.iface);
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    assert_eq!(p.public_key, b.keys.public);
    assert_eq!(p.endpoint, format!("{}:{}", link.b_addr, b.port));
    assert_eq!(p.allowed_ips, format!("{}/32,fd77::2/128", b.inner4));
    let now = now_epoch();
    assert!(
        p.latest_handshake + 120 >= now && p.latest_handshake <= now + 1,
        "latest handshake {} is not wall time near {now}",
        p.latest_handshake
    );
    assert!(p.rx > 0 && p.tx > 0, "transfer rx={} tx={}", p.rx, p.tx);
    assert_eq!(p.keepalive, "off");

    // The human-readable form too.
    let show = link.a.wg(&["show", &a.dev.iface]);
    assert!(show.contains(&format!("peer: {}", b.keys.public)), "{show}");
    assert!(show.contains("latest handshake: "), "{show}");
    assert!(show.contains("transfer: "), "{show}");
    assert!(
        show.contains(&format!("listening port: {}", a.port)),
        "{show}"
    );

    // The public key the device derives matches wg's.
    assert_eq!(
        link.a.wg(&["show", &a.dev.iface, "public-key"]).trim(),
        a.keys.public
    );
}

#[test]
fn showconf_round_trips_through_setconf() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    link.a.wg(&[
        "set",
        &a.dev.iface,
        "fwmark",
        "0x1234",
        "peer",
        &b.keys.public,
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "10.77.0.2/32,fd77::2/128,10.200.0.0/16",
    ]);
    let psk = TempFile::new(&run(std::process::Command::new("wg").arg("genpsk")));
    link.a.wg(&[
        "set",
        &a.dev.iface,
        "peer",
        &b.keys.public,
        "preshared-key",
        psk.path(),
    ]);
    link.b.wg(&[
        "set",
        &b.dev.iface,
        "peer",
        &a.keys.public,
        "preshared-key",
        psk.path(),
    ]);

    let conf = link.a.wg(&["showconf", &a.dev.iface]);
    assert!(conf.contains("FwMark = 0x1234"), "{conf}");
    assert!(conf.contains("PersistentKeepalive = 25"), "{conf}");
    assert!(conf.contains("PresharedKey = "), "{conf}");
    assert!(conf.contains("10.200.0.0/16"), "{conf}");

    let file = TempFile::new(&conf);
    link.a.wg(&["setconf", &a.dev.iface, file.path()]);
    assert_eq!(link.a.wg(&["showconf", &a.dev.iface]), conf);

    // The preshared key is in use on both sides: traffic flows.
    assert!(link.a.ping(&b.inner4, 5), "ping with preshared key failed");

    // syncconf after removing a peer from the file removes it from the device.
    let without_peer: String = conf.split("[Peer]").next().unwrap().to_owned();
    let file = TempFile::new(&without_peer);
    link.a.wg(&["syncconf", &a.dev.iface, file.path()]);
    assert!(dump(&link.a, &a.dev.iface).is_empty());
    assert!(
        !link.a.ping(&b.inner4, 1),
        "ping must fail without the peer"
    );
}

#[test]
fn wg_set_changes_take_effect() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    assert!(link.a.ping(&b.inner4, 3));

    // A new listen port: the peer learns it from the next authenticated packet (roaming).
    link.a.wg(&["set", &a.dev.iface, "listen-port", "40001"]);
    assert!(
        link.a
            .wg(&["show", &a.dev.iface])
            .contains("listening port: 40001")
    );
    assert!(link.a.ping(&b.inner4, 5), "ping after rebind failed");
    wait_until("b to see a's new port", Duration::from_secs(5), || {
        dump(&link.b, &b.dev.iface)[0].endpoint.ends_with(":40001")
    });

    // A port that is taken is refused with EADDRINUSE and changes nothing.
    let busy = link
        .a
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:40002").unwrap());
    let out = link
        .a
        .wg_status(&["set", &a.dev.iface, "listen-port", "40002"]);
    assert!(!out.status.success(), "binding a busy port must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Address already in use"),
        "{out:?}"
    );
    drop(busy);
    assert!(
        link.a
            .wg(&["show", &a.dev.iface])
            .contains("listening port: 40001")
    );

    // Allowed IPs decide routing: without b's address, no traffic.
    link.a.wg(&[
        "set",
        &a.dev.iface,
        "peer",
        &b.keys.public,
        "allowed-ips",
        "10.99.0.0/24",
    ]);
    assert!(
        !link.a.ping(&b.inner4, 1),
        "ping must fail outside allowed IPs"
    );
    link.a.wg(&[
        "set",
        &a.dev.iface,
        "peer",
        &b.keys.public,
        "allowed-ips",
        "10.77.0.0/24",
    ]);
    assert!(link.a.ping(&b.inner4, 3), "ping within allowed IPs failed");

    // Removing the peer stops traffic; re-adding it restores it.
    link.a
        .wg(&["set", &a.dev.iface, "peer", &b.keys.public, "remove"]);
    assert!(dump(&link.a, &a.dev.iface).is_empty());
    assert!(!link.a.ping(&b.inner4, 1));
    add_peer(&a, &b, &format!("{}:{}", link.b_addr, b.port), None);
    assert!(
        link.a.ping(&b.inner4, 5),
        "ping after re-adding the peer failed"
    );
}

#[test]
fn inbound_packets_from_outside_allowed_ips_are_dropped() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    // b gets a second inner address that a does not accept from b.
    link.b
        .ip(&["addr", "add", "10.77.0.200/24", "dev", &b.dev.iface]);
    let ping_from_200 = || {
        b.ns.cmd("ping")
            .args([
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.77.0.200",
                &a.inner4,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    // Packets a's device hands to its interface, as the kernel counts them.
    let delivered = || -> u64 {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", a.dev.iface);
        run(link.a.cmd("cat").arg(path)).trim().parse().unwrap()
    };
    // b encrypts it (a's address is in b's allowed IPs for a); a decrypts and must drop it.
    let before = delivered();
    assert!(
        !ping_from_200(),
        "a accepted a packet from outside b's allowed IPs"
    );
    assert_eq!(
        delivered(),
        before,
        "a delivered packets from a source b may not use"
    );
    assert!(
        dump(&link.a, &a.dev.iface)[0].rx > 0,
        "the packets did reach a's device"
    );
    // Once a allows the source, the same ping is delivered and answered.
    link.a.wg(&[
        "set",
        &a.dev.iface,
        "peer",
        &b.keys.public,
        "allowed-ips",
        "10.77.0.2/32,10.77.0.200/32",
    ]);
    assert!(ping_from_200(), "ping from an allowed source failed");
    assert!(delivered() > before);
}

#[test]
fn device_exits_cleanly_on_sigterm_and_removes_its_socket() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("t");
    let iface = unique("wt");
    let mut dev = DeviceProc::start(&ns, Impl::Wgmesh, &iface);
    let sock = dev.socket();
    assert!(sock.exists());
    assert!(ns.ip(&["link", "show", &iface]).contains(&iface));
    let status = dev.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "socket left behind");
    let out = ns
        .cmd("ip")
        .args(["link", "show", &iface])
        .output()
        .unwrap();
    assert!(!out.status.success(), "interface left behind");
}

#[test]
fn deleting_the_interface_stops_the_device() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("t");
    let iface = unique("wt");
    let mut dev = DeviceProc::start(&ns, Impl::Wgmesh, &iface);
    ns.ip(&["link", "del", &iface]);
    wait_until(
        "device to exit after link deletion",
        Duration::from_secs(5),
        || !dev.alive(),
    );
    assert!(!dev.socket().exists(), "socket left behind");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("t");
    let iface = unique("wt");
    // A stale socket file: bound once, nobody listening.
    let path = std::path::Path::new(SOCKET_DIR).join(format!("{iface}.sock"));
    std::fs::create_dir_all(SOCKET_DIR).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let _dev = DeviceProc::start(&ns, Impl::Wgmesh, &iface);
    assert!(
        ns.wg(&["show", &iface])
            .contains(&format!("interface: {iface}"))
    );

    // A second device with the same name in another namespace must refuse to steal it.
    let ns2 = Netns::new("t");
    let out = ns2
        .wgmesh_device(&iface)
        .arg("--foreground")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "second device took over a live socket"
    );
    assert!(
        ns.wg(&["show", &iface])
            .contains(&format!("interface: {iface}"))
    );
}

#[test]
fn daemonized_device_comes_up_and_answers() {
    if !privileged() {
        return;
    }
    daemonized_device_comes_up_and_stops_with_its_link();
}
