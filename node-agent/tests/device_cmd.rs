//! `wgmesh-agent device <iface>` is the standalone device of `wgmesh-device` under the agent's
//! binary (docs, images and scripts call it so). Daemonized, it starts itself again as
//! `wgmesh-agent device <iface> --foreground` and comes up. The device's own behaviour is tested
//! in `device/tests/`, through the `wgmesh-device` binary.

#![allow(clippy::unwrap_used)]

#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::*;
use std::time::Duration;

#[test]
fn a_daemonized_agent_device_comes_up_answers_wg_and_stops_with_its_link() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("t");
    let iface = unique("wd");
    let status = ns.wgmesh_device(&iface).status().unwrap();
    assert!(status.success());
    // The parent returned only once the socket was there.
    assert!(
        ns.wg(&["show", &iface])
            .contains(&format!("interface: {iface}"))
    );
    ns.ip(&["link", "del", &iface]);
    let sock = std::path::Path::new(SOCKET_DIR).join(format!("{iface}.sock"));
    wait_until("background device to exit", Duration::from_secs(5), || {
        !sock.exists()
    });
}
