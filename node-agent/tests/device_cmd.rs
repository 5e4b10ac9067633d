//! `wgmesh-agent device <iface>` is the standalone device of `wgmesh-device` under the agent's
//! binary (docs, images and scripts call it so). Daemonized, it starts itself again as
//! `wgmesh-agent device <iface> --foreground` and comes up. The device's own behaviour is tested
//! in `device/tests/`, through the `wgmesh-device` binary.

#![allow(clippy::unwrap_used)]

#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::*;

#[test]
fn a_daemonized_agent_device_comes_up_answers_wg_and_stops_with_its_link() {
    if !privileged() {
        return;
    }
    daemonized_device_comes_up_and_stops_with_its_link();
}
