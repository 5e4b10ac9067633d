//! Hostile input: random and truncated datagrams on the UDP port, garbage on the UAPI socket.
//! The device keeps running, keeps forwarding and keeps answering `wg`.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[test]
fn garbage_datagrams_do_not_disturb_the_device() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (mut a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    assert!(link.a.ping(&b.inner4, 3));

    let mut seed = 0x5eed_u64;
    let mut datagrams = Vec::new();
    for len in [
        0usize, 1, 3, 4, 15, 16, 31, 32, 33, 64, 92, 148, 149, 1500, 9000, 65000,
    ] {
        datagrams.push(noise(&mut seed, len));
    }
    // Well-formed headers with random bodies, at the exact and at wrong lengths.
    for (kind, len) in [(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 1400)] {
        for delta in [-1i64, 0, 1] {
            let n = (len as i64 + delta) as usize;
            let mut d = noise(&mut seed, n);
            if n >= 4 {
                d[..4].copy_from_slice(&[kind, 0, 0, 0]);
            }
            datagrams.push(d);
        }
    }
    for _ in 0..2000 {
        let len = (noise(&mut seed, 2)[0] as usize) * 6;
        let mut d = noise(&mut seed, len);
        if let Some(first) = d.first_mut() {
            *first %= 6;
        }
        if d.len() >= 4 {
            d[1..4].fill(0);
        }
        datagrams.push(d);
    }
    // Aimed at a's data path: b's session indices are unknown, so also spray data headers.
    let to4: SocketAddr = format!("{}:{}", link.a_addr, a.port).parse().unwrap();
    let to6: SocketAddr = format!("[{}]:{}", link.a_addr6, a.port).parse().unwrap();
    send_udp(&link.b, to4, datagrams.clone());
    send_udp(&link.b, to6, datagrams);

    assert!(a.dev.alive(), "device died:\n{}", a.dev.log_text());
    assert!(link.a.ping(&b.inner4, 3), "ping after UDP garbage failed");
    assert!(
        link.b.ping(&a.inner6, 3),
        "IPv6 ping after UDP garbage failed"
    );
    // Garbage from b's address did not move the endpoint.
    assert_eq!(
        dump(&link.a, &a.dev.iface)[0].endpoint,
        format!("{}:{}", link.b_addr, b.port)
    );
}

/// Sends `input` on a fresh UAPI connection and returns whatever comes back before the device
/// closes the connection or goes quiet.
fn uapi_exchange(socket: &std::path::Path, input: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(input);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn garbage_on_the_uapi_socket_gets_errors_and_the_device_keeps_serving() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (mut a, b) = tunnel(&link, Impl::Wgmesh, Impl::Wgmesh);
    assert!(link.a.ping(&b.inner4, 3));
    let sock = a.dev.socket();

    // Answers with wireguard-go's codes.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"set=1\nlisten_port=abc\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nno_equals_sign\n\n".to_vec(), "errno=-71\n\n"),
        (b"set=1\nprivate_key=zz\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\npublic_key=1234\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nbogus=1\n\n".to_vec(), "errno=-22\n\n"),
        (b"get=1\nx\n".to_vec(), "errno=-22\n\n"),
        (b"hello\n".to_vec(), "errno=-22\n\n"),
        (vec![b'A'; 1 << 20], "errno=-71\n\n"),
        (b"set=1\n\xff\xfe\n\n".to_vec(), "errno=-71\n\n"),
    ];
    for (input, want) in &cases {
        let got = uapi_exchange(&sock, input);
        assert_eq!(
            &got,
            want,
            "input {:?}",
            String::from_utf8_lossy(&input[..input.len().min(40)])
        );
    }
    // A bad set leaves the connection in step: the next request on it is answered.
    let got = uapi_exchange(&sock, b"set=1\nbogus=1\n\nget=1\n\n");
    assert!(
        got.starts_with("errno=-22\n\n") && got.contains("private_key="),
        "{got}"
    );

    // Random bytes and truncated requests.
    let mut seed = 7u64;
    for len in [1usize, 10, 100, 1000, 100_000] {
        let _ = uapi_exchange(&sock, &noise(&mut seed, len));
    }
    for input in [
        &b"get=1"[..],
        b"get=1\n",
        b"set=1\npublic_key=",
        b"set=",
        b"\n\n\n",
    ] {
        let _ = uapi_exchange(&sock, input);
    }
    // A client that connects and says nothing does not block others.
    let _idle = UnixStream::connect(&sock).unwrap();

    assert!(a.dev.alive(), "device died:\n{}", a.dev.log_text());
    let show = link.a.wg(&["show", &a.dev.iface]);
    assert!(show.contains(&b.keys.public), "{show}");
    assert!(link.a.wg(&["show", &a.dev.iface, "listen-port"]).trim() == a.port.to_string());
    assert!(link.a.ping(&b.inner4, 3), "ping after UAPI garbage failed");
}
