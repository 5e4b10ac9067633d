//! The library API the node agent uses in-process: `Device::start` and `DeviceHandle`. Each
//! test runs on a thread moved into a fresh network namespace, so the TUN interface and the
//! socket it creates are its own and vanish with it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use wgmesh_device::config::{ConfigUpdate, PeerUpdate};
use wgmesh_device::{Device, DeviceConfig, DeviceError};

/// Runs `f` on a thread in a new, empty network namespace. Not root, it fails, unless
/// `WGMESH_SKIP_PRIVILEGED=1` asks to skip (then `None`, after saying so).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("WGMESH_SKIP_PRIVILEGED").is_ok_and(|v| v == "1"),
            "the device API tests need root (network namespaces, TUN): run them as root, or set \
             WGMESH_SKIP_PRIVILEGED=1 to skip them"
        );
        eprintln!("SKIPPED (WGMESH_SKIP_PRIVILEGED=1): this device API test needs root");
        return None;
    }
    Some(
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread, which the test owns.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap(),
    )
}

/// Whether the calling thread's namespace has the interface (sysfs would show the mount's).
fn link_exists(name: &str) -> bool {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn key(b: u8) -> [u8; 32] {
    let mut k = [b; 32];
    // Clamp like a real private key would be; any 32 bytes are a valid public key.
    k[0] &= 248;
    k
}

#[test]
fn configure_read_back_and_shut_down() {
    let Some(()) = in_fresh_netns(|| {
        let dev = Device::start(DeviceConfig {
            listen_port: 0,
            private_key: Some(key(7).into()),
            ..DeviceConfig::new("wgapi0")
        })
        .unwrap();
        assert!(link_exists("wgapi0"));
        assert_ne!(dev.listen_port(), 0);
        assert!(dev.public_key().is_some());

        // Upsert a peer, then update it by identity.
        let mut peer = PeerUpdate::new([1; 32]);
        peer.endpoint = Some("192.0.2.1:51820".parse::<SocketAddr>().unwrap());
        peer.allowed_ips = vec!["10.1.0.0/24".parse().unwrap()];
        let id = dev.upsert_peer(&peer).unwrap();
        let mut more = PeerUpdate::new([1; 32]);
        more.allowed_ips = vec!["fd01::/64".parse().unwrap()];
        assert_eq!(dev.upsert_peer(&more), Some(id));
        assert_eq!(dev.peer_id(&[1; 32]), Some(id));
        let stats = dev.peer(id).unwrap();
        assert_eq!(stats.endpoint, peer.endpoint);
        assert_eq!(stats.allowed_ips.len(), 2);
        assert_eq!(
            (stats.rx_bytes, stats.tx_bytes, stats.last_handshake),
            (0, 0, None)
        );

        // update_only never creates; the device's own key is never a peer.
        let mut ghost = PeerUpdate::new([2; 32]);
        ghost.update_only = true;
        assert_eq!(dev.upsert_peer(&ghost), None);
        assert_eq!(
            dev.upsert_peer(&PeerUpdate::new(dev.public_key().unwrap())),
            None
        );
        assert_eq!(dev.snapshot().peers.len(), 1);

        // Rebinding: a fixed port, then a busy one is refused and changes nothing.
        let port = dev.set_listen_port(41234).unwrap();
        assert_eq!(port, 41234);
        let busy = std::net::UdpSocket::bind("0.0.0.0:41235").unwrap();
        assert!(matches!(
            dev.set_listen_port(41235),
            Err(DeviceError::BindUdp { .. })
        ));
        drop(busy);
        assert_eq!(dev.listen_port(), 41234);

        // replace_peers empties the table; removal by key reports whether it existed.
        dev.apply(&ConfigUpdate {
            replace_peers: true,
            peers: vec![PeerUpdate::new([3; 32])],
            ..ConfigUpdate::default()
        })
        .unwrap();
        assert_eq!(dev.peer_id(&[1; 32]), None);
        assert!(dev.remove_peer(&[3; 32]));
        assert!(!dev.remove_peer(&[3; 32]));

        // Removing the private key keeps peers but no sessions; the snapshot says so.
        dev.upsert_peer(&PeerUpdate::new([4; 32])).unwrap();
        dev.set_private_key(None);
        let snap = dev.snapshot();
        assert_eq!(snap.public_key, None);
        assert!(dev.private_key().is_none());
        assert_eq!(snap.peers.len(), 1);

        dev.shutdown();
        assert!(dev.is_stopped());
        assert!(
            !link_exists("wgapi0"),
            "interface left behind after shutdown"
        );
        // Shutdown is idempotent.
        dev.shutdown();
    }) else {
        return;
    };
}

#[test]
fn dropping_the_last_handle_stops_the_device() {
    let Some(()) = in_fresh_netns(|| {
        let dev = Device::start(DeviceConfig::new("wgapi1")).unwrap();
        let clone = dev.clone();
        drop(dev);
        assert!(link_exists("wgapi1"), "a clone still holds the device");
        drop(clone);
        assert!(
            !link_exists("wgapi1"),
            "interface left behind after the last handle"
        );
    }) else {
        return;
    };
}

#[test]
fn a_panicked_datapath_thread_stops_the_whole_device_and_says_why() {
    let dir = std::env::temp_dir().join(format!("wgmesh-failpoints-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let failpoints = dir.clone();
    let Some(()) = in_fresh_netns(move || {
        let dev = Device::start(DeviceConfig {
            private_key: Some(key(9).into()),
            failpoints: Some(failpoints.clone()),
            ..DeviceConfig::new("wgapi2")
        })
        .unwrap();
        assert_eq!(dev.failure(), None);
        std::fs::write(failpoints.join("wg-timers"), b"").unwrap();
        // The other threads are stopped too: wait() returns once the device has stopped.
        dev.wait();
        assert!(dev.is_stopped());
        assert_eq!(
            dev.failure().as_deref(),
            Some("datapath thread wg-timers panicked")
        );
    }) else {
        return;
    };
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_hands_its_interface_and_port_to_a_successor_and_survives_one_that_quits() {
    let Some(()) = in_fresh_netns(|| {
        let dir = std::env::temp_dir().join(format!("wgmesh-ho-{}", std::process::id()));
        let config = DeviceConfig {
            up: true,
            private_key: Some(key(7).into()),
            handover: Some(dir.join("handover.sock")),
            ..DeviceConfig::new("wgho0")
        };
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !cond() {
                assert!(
                    std::time::Instant::now() < until,
                    "timed out waiting for {what}"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let first = Device::start(config.clone()).unwrap();
        let port = first.listen_port();

        // A successor attaches, then goes away before taking over: the first carries on.
        let quitter = Device::start(config.clone()).unwrap();
        assert!(quitter.is_taking_over());
        assert_eq!(quitter.listen_port(), port, "the socket is handed over");
        wait("the first device to see its successor", &|| {
            first.is_handing_over()
        });
        drop(quitter);
        wait("the first device to carry on alone", &|| {
            !first.is_handing_over()
        });
        assert!(!first.is_stopped() && first.failure().is_none());
        assert!(link_exists("wgho0"));

        // The next one takes over; the first lingers, then stops without taking the
        // interface or the port with it.
        let second = Device::start(config.clone()).unwrap();
        assert!(second.is_taking_over());
        second.take_over(std::time::Duration::ZERO);
        assert!(!second.is_taking_over());
        wait("the first device to finish", &|| first.handed_over());
        assert!(first.is_stopped() && first.failure().is_none());
        drop(first);
        assert!(
            link_exists("wgho0"),
            "the interface went with the first device"
        );
        assert_eq!(second.listen_port(), port);
        assert!(!second.is_stopped() && second.failure().is_none());

        // A device without a handover path never looks for a predecessor.
        let err = Device::start(DeviceConfig::new("wgho0")).unwrap_err();
        assert!(matches!(err, DeviceError::CreateTun { .. }), "{err:?}");
        drop(second);
        assert!(!link_exists("wgho0"));
        let _ = std::fs::remove_dir_all(&dir);
    }) else {
        return;
    };
}
