//! The kernel as the agent's apply step sees it: a small trait over what it reads and writes
//! (links, addresses, the routes it owns), [`Netlink`] in the agent and an in-memory fake in
//! tests, and the apply steps written against it. What to want is decided elsewhere
//! (`wgmesh_core::topology`); these functions bring the kernel to it, in an order that never
//! leaves a pod destination without a route of ours, and say what happened.

use super::netlink::{Address, Link, Netlink, NetlinkError};
use futures::StreamExt;
use ipnet::IpNet;
use wgmesh_core::topology::{self, NextHop, Route};

/// What the agent reads from and writes to the kernel's networking.
pub(crate) trait Kernel {
    async fn links(&self) -> Result<Vec<Link>, NetlinkError>;
    async fn addresses(&self) -> Result<Vec<Address>, NetlinkError>;
    /// Makes the host address `addr` present on link `index` (reading the link's addresses
    /// first; present, nothing is written).
    async fn ensure_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError>;
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError>;
    /// The routes of ours (the agent's route protocol); a route through a link other than
    /// `device_index` comes back through the device with metric `u32::MAX`, which no plan
    /// wants, so the diff removes it.
    async fn owned_routes(&self, device_index: Option<u32>) -> Result<Vec<Route>, NetlinkError>;
    async fn add_route(&self, route: &Route, device_index: Option<u32>)
    -> Result<(), NetlinkError>;
    async fn del_route(&self, route: &Route, device_index: Option<u32>)
    -> Result<(), NetlinkError>;
}

impl Kernel for Netlink {
    async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        Netlink::links(self).await
    }
    async fn addresses(&self) -> Result<Vec<Address>, NetlinkError> {
        Netlink::addresses(self).await
    }
    async fn ensure_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        Netlink::ensure_address(self, index, addr).await
    }
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        Netlink::set_mtu(self, index, mtu).await
    }
    async fn owned_routes(&self, device_index: Option<u32>) -> Result<Vec<Route>, NetlinkError> {
        Netlink::owned_routes(self, device_index).await
    }
    async fn add_route(
        &self,
        route: &Route,
        device_index: Option<u32>,
    ) -> Result<(), NetlinkError> {
        Netlink::add_route(self, route, device_index).await
    }
    async fn del_route(
        &self,
        route: &Route,
        device_index: Option<u32>,
    ) -> Result<(), NetlinkError> {
        Netlink::del_route(self, route, device_index).await
    }
}

/// The kernel as a pass sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The device's link, if the interface exists.
    pub device: Option<Link>,
    /// Addresses with their prefixes on the node's other links (not loopback, the device or
    /// the pod bridge): the networks peers may be on-link in.
    pub on_link: Vec<IpNet>,
}

/// Reads the links and addresses a pass plans from.
pub(crate) async fn observe<K: Kernel>(
    kernel: &K,
    interface: &str,
    bridge: &str,
) -> Result<Observed, NetlinkError> {
    let links = kernel.links().await?;
    let device = links.iter().find(|l| l.name == interface).cloned();
    let skip: Vec<u32> = links
        .iter()
        .filter(|l| l.name == "lo" || l.name == interface || l.name == bridge)
        .map(|l| l.index)
        .collect();
    let on_link = kernel
        .addresses()
        .await?
        .into_iter()
        .filter(|a| !skip.contains(&a.link))
        .map(|a| a.net)
        .collect();
    Ok(Observed { device, on_link })
}

/// The MTU of the link holding the address `ip` (the node's endpoint); 1500 when it cannot
/// be told (no endpoint, a failed read, an address on no link).
pub(crate) async fn underlay_mtu<K: Kernel>(kernel: &K, ip: Option<std::net::IpAddr>) -> u32 {
    const FALLBACK_MTU: u32 = 1500;
    let Some(ip) = ip else {
        return FALLBACK_MTU;
    };
    let (Ok(addrs), Ok(links)) = (kernel.addresses().await, kernel.links().await) else {
        return FALLBACK_MTU;
    };
    addrs
        .iter()
        .find(|a| a.net.addr() == ip)
        .and_then(|a| links.iter().find(|l| l.index == a.link))
        .map_or(FALLBACK_MTU, |l| l.mtu)
}

/// Removes every route of ours (an uninstall); returns how many there were.
pub(crate) async fn remove_owned_routes<K: Kernel>(
    kernel: &K,
    device_index: Option<u32>,
) -> Result<usize, NetlinkError> {
    let routes = kernel.owned_routes(device_index).await?;
    let mut failed = None;
    for r in &routes {
        if let Err(e) = kernel.del_route(r, device_index).await {
            failed = Some(e);
        }
    }
    failed.map_or(Ok(routes.len()), Err)
}

/// What [`apply_routes`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RoutesApplied {
    /// Every route of the plan is installed and no other route of ours is left.
    pub ok: bool,
    /// Every blackhole of the plan is installed: pods may be plumbed.
    pub fenced: bool,
    pub added: usize,
    pub removed: usize,
    /// What failed, for the log.
    pub failures: Vec<String>,
}

/// Brings the routes of ours to `desired`. Routes through the device are left out while
/// there is no device (`device_index` `None`). Blackholes go in first and removals come last,
/// so no destination is ever without a route of ours in between. A failed read writes
/// nothing and reports neither installed nor fenced.
pub(crate) async fn apply_routes<K: Kernel>(
    kernel: &K,
    desired: &[Route],
    device_index: Option<u32>,
) -> RoutesApplied {
    let installed = match kernel.owned_routes(device_index).await {
        Ok(r) => r,
        Err(e) => {
            return RoutesApplied {
                failures: vec![format!("reading routes: {e}")],
                ..RoutesApplied::default()
            };
        }
    };
    let desired: Vec<Route> = desired
        .iter()
        .filter(|r| device_index.is_some() || r.via != NextHop::Device)
        .copied()
        .collect();
    let (add, remove) = topology::diff_routes(&installed, &desired);
    let (blackholes, through): (Vec<Route>, Vec<Route>) =
        add.into_iter().partition(|r| r.via == NextHop::Blackhole);
    let mut out = RoutesApplied {
        ok: true,
        fenced: true,
        ..RoutesApplied::default()
    };
    // Blackholes first, removals last; within each step, many requests in flight (a new node
    // of a 1,000-node mesh adds some 4,000 routes: one at a time, that was half a second).
    for step in [blackholes, through] {
        let results: Vec<(Route, Result<(), NetlinkError>)> = futures::stream::iter(step)
            .map(|r| async move { (r, kernel.add_route(&r, device_index).await) })
            .buffer_unordered(ROUTES_IN_FLIGHT)
            .collect()
            .await;
        for (r, result) in results {
            match result {
                Ok(()) => out.added += 1,
                Err(e) => {
                    out.ok = false;
                    out.fenced &= r.via != NextHop::Blackhole;
                    out.failures.push(format!("adding a route: {e}"));
                }
            }
        }
    }
    let results: Vec<Result<(), NetlinkError>> = futures::stream::iter(&remove)
        .map(|r| kernel.del_route(r, device_index))
        .buffer_unordered(ROUTES_IN_FLIGHT)
        .collect()
        .await;
    for result in results {
        match result {
            Ok(()) => out.removed += 1,
            Err(e) => {
                out.ok = false;
                out.failures.push(format!("removing a route: {e}"));
            }
        }
    }
    out
}

/// How many route requests are in flight at once.
const ROUTES_IN_FLIGHT: usize = 64;

/// Sets the device's MTU to `mtu` if `device` (as last read) has another; returns the MTU
/// it had when it changed it.
pub(crate) async fn apply_mtu<K: Kernel>(
    kernel: &K,
    device: Option<&Link>,
    mtu: u32,
) -> Result<Option<u32>, NetlinkError> {
    match device {
        Some(link) if link.mtu != mtu => {
            kernel.set_mtu(link.index, mtu).await?;
            Ok(Some(link.mtu))
        }
        _ => Ok(None),
    }
}

/// The device's host addresses: each own subnet's first address, as a host address, the
/// source of the node's own traffic to remote pods (remote nodes route it back through the
/// tunnel).
pub(crate) fn device_addresses(own_subnets: &[IpNet]) -> Vec<IpNet> {
    own_subnets
        .iter()
        .map(|s| IpNet::new(s.network(), s.max_prefix_len()).unwrap_or(*s))
        .collect()
}

/// Puts the device's host addresses (see [`device_addresses`]) on link `index`; returns
/// what failed.
pub(crate) async fn apply_addresses<K: Kernel>(
    kernel: &K,
    index: u32,
    own_subnets: &[IpNet],
) -> Vec<String> {
    let mut failures = Vec::new();
    for host in device_addresses(own_subnets) {
        if let Err(e) = kernel.ensure_address(index, host).await {
            failures.push(format!("adding {host} to the device: {e}"));
        }
    }
    failures
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory kernel: links, addresses and routes, every write recorded in order, and
    //! failures on demand.

    use super::*;
    use crate::agent::netlink::Address;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub(crate) struct State {
        pub links: Vec<Link>,
        pub addresses: Vec<Address>,
        /// Routes of ours, with the link they go through (for device routes).
        pub routes: BTreeSet<(Route, Option<u32>)>,
        /// Every write, in order, as text.
        pub writes: Vec<String>,
        pub fail_reads: bool,
        /// Writes whose text contains one of these fail (and change nothing).
        pub fail_writes: Vec<String>,
    }

    #[derive(Debug, Default)]
    pub(crate) struct FakeKernel(pub Mutex<State>);

    impl FakeKernel {
        pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn write(&self, what: String) -> Result<(), NetlinkError> {
            let mut s = self.state();
            let failed = s.fail_writes.iter().any(|f| what.contains(f.as_str()));
            s.writes
                .push(format!("{what}{}", if failed { " (failed)" } else { "" }));
            if failed {
                return Err(NetlinkError::NoSuchLink(format!(
                    "injected failure: {what}"
                )));
            }
            Ok(())
        }

        /// Deletes a link: like the kernel, every route through it goes too.
        pub(crate) fn remove_link(&self, index: u32) {
            let mut s = self.state();
            s.links.retain(|l| l.index != index);
            s.routes.retain(|(_, link)| *link != Some(index));
        }

        fn read(&self) -> Result<(), NetlinkError> {
            if self.state().fail_reads {
                return Err(NetlinkError::NoSuchLink("injected read failure".into()));
            }
            Ok(())
        }
    }

    fn text(r: &Route) -> String {
        let via = match r.via {
            NextHop::Device => "dev".to_owned(),
            NextHop::Gateway(g) => format!("via {g}"),
            NextHop::Blackhole => "blackhole".to_owned(),
        };
        format!("{} {via} metric {}", r.dst, r.metric)
    }

    impl Kernel for FakeKernel {
        async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
            self.read()?;
            Ok(self.state().links.clone())
        }
        async fn addresses(&self) -> Result<Vec<Address>, NetlinkError> {
            self.read()?;
            Ok(self.state().addresses.clone())
        }
        async fn ensure_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
            self.read()?;
            if self
                .state()
                .addresses
                .iter()
                .any(|a| a.link == index && a.net == addr)
            {
                return Ok(());
            }
            self.write(format!("address add {addr} dev {index}"))?;
            self.state().addresses.push(Address {
                link: index,
                net: addr,
            });
            Ok(())
        }
        async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
            self.write(format!("link set {index} mtu {mtu}"))?;
            for l in &mut self.state().links {
                if l.index == index {
                    l.mtu = mtu;
                }
            }
            Ok(())
        }
        async fn owned_routes(
            &self,
            device_index: Option<u32>,
        ) -> Result<Vec<Route>, NetlinkError> {
            self.read()?;
            let mut out: Vec<Route> = self
                .state()
                .routes
                .iter()
                .map(|(r, link)| match r.via {
                    NextHop::Device if *link != device_index => Route {
                        metric: u32::MAX,
                        ..*r
                    },
                    _ => *r,
                })
                .collect();
            out.sort();
            Ok(out)
        }
        async fn add_route(
            &self,
            route: &Route,
            device_index: Option<u32>,
        ) -> Result<(), NetlinkError> {
            self.write(format!("route replace {}", text(route)))?;
            let link = (route.via == NextHop::Device)
                .then_some(device_index)
                .flatten();
            let mut s = self.state();
            // Replace: one route per destination and metric.
            s.routes
                .retain(|(r, _)| !(r.dst == route.dst && r.metric == route.metric));
            s.routes.insert((*route, link));
            Ok(())
        }
        async fn del_route(
            &self,
            route: &Route,
            _device_index: Option<u32>,
        ) -> Result<(), NetlinkError> {
            self.write(format!("route del {}", text(route)))?;
            self.state()
                .routes
                .retain(|(r, _)| !(r.dst == route.dst && r.metric == route.metric));
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fake::FakeKernel;
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("network")
    }

    fn dev(dst: &str) -> Route {
        Route {
            dst: net(dst),
            via: NextHop::Device,
            metric: topology::ROUTE_METRIC,
        }
    }

    fn hole(dst: &str) -> Route {
        Route {
            dst: net(dst),
            via: NextHop::Blackhole,
            metric: topology::BLACKHOLE_METRIC,
        }
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn blackholes_go_in_first_and_a_second_pass_writes_nothing() {
        let k = FakeKernel::default();
        let want = [
            dev("10.244.1.0/24"),
            hole("10.244.0.0/16"),
            dev("10.244.2.0/24"),
        ];
        let done = block(apply_routes(&k, &want, Some(7)));
        assert_eq!(
            done,
            RoutesApplied {
                ok: true,
                fenced: true,
                added: 3,
                removed: 0,
                failures: vec![],
            }
        );
        let writes = k.state().writes.clone();
        assert!(writes[0].contains("blackhole"), "{writes:?}");
        assert_eq!(writes.len(), 3);

        let again = block(apply_routes(&k, &want, Some(7)));
        assert_eq!((again.added, again.removed, again.ok), (0, 0, true));
        assert_eq!(k.state().writes.len(), 3, "a converged kernel got writes");
    }

    #[test]
    fn a_replaced_device_is_routed_again_and_routes_no_longer_wanted_go_last() {
        let k = FakeKernel::default();
        let first = [
            hole("10.244.0.0/16"),
            dev("10.244.1.0/24"),
            dev("10.244.3.0/24"),
        ];
        block(apply_routes(&k, &first, Some(7)));
        // The device was replaced: its link deleted (its routes with it), the new one 9.
        k.remove_link(7);
        k.state().writes.clear();
        let done = block(apply_routes(&k, &first, Some(9)));
        assert_eq!((done.ok, done.added, done.removed), (true, 2, 0));
        assert!(
            k.state()
                .routes
                .iter()
                .all(|(r, link)| r.via != NextHop::Device || *link == Some(9))
        );

        // 10.244.3.0/24 is no longer wanted, 10.244.4.0/24 is: the add comes first.
        k.state().writes.clear();
        let second = [
            hole("10.244.0.0/16"),
            dev("10.244.1.0/24"),
            dev("10.244.4.0/24"),
        ];
        let done = block(apply_routes(&k, &second, Some(9)));
        assert_eq!((done.ok, done.added, done.removed), (true, 1, 1));
        let writes = k.state().writes.clone();
        assert_eq!(
            writes,
            vec![
                "route replace 10.244.4.0/24 dev metric 100",
                "route del 10.244.3.0/24 dev metric 100"
            ]
        );
    }

    #[test]
    fn without_a_device_only_the_blackholes_are_installed() {
        let k = FakeKernel::default();
        let done = block(apply_routes(
            &k,
            &[hole("10.244.0.0/16"), dev("10.244.1.0/24")],
            None,
        ));
        assert!(done.ok && done.fenced);
        assert_eq!(k.state().writes.len(), 1);
        assert!(k.state().writes[0].contains("blackhole"));
    }

    #[test]
    fn a_failed_blackhole_is_not_fenced_and_a_failed_read_writes_nothing() {
        let k = FakeKernel::default();
        k.state().fail_writes = vec!["blackhole".into()];
        let done = block(apply_routes(
            &k,
            &[hole("10.244.0.0/16"), dev("10.244.1.0/24")],
            Some(7),
        ));
        assert!(!done.ok && !done.fenced, "{done:?}");
        assert_eq!(done.added, 1);
        assert_eq!(done.failures.len(), 1);

        let k = FakeKernel::default();
        k.state().fail_reads = true;
        let done = block(apply_routes(&k, &[hole("10.244.0.0/16")], Some(7)));
        assert!(!done.ok && !done.fenced);
        assert!(k.state().writes.is_empty());
    }

    #[test]
    fn the_mtu_is_set_only_when_it_differs() {
        let k = FakeKernel::default();
        let link = Link {
            index: 7,
            name: "wg0".into(),
            mtu: 1420,
            up: true,
        };
        k.state().links.push(link.clone());
        assert_eq!(block(apply_mtu(&k, Some(&link), 1420)).ok(), Some(None));
        assert!(k.state().writes.is_empty());
        assert_eq!(
            block(apply_mtu(&k, Some(&link), 1380)).ok(),
            Some(Some(1420))
        );
        assert_eq!(k.state().links[0].mtu, 1380);
        assert_eq!(block(apply_mtu(&k, None, 1380)).ok(), Some(None));
    }

    #[test]
    fn each_own_subnet_gives_the_device_its_first_address() {
        assert_eq!(
            device_addresses(&[net("10.244.1.0/24"), net("fd00:10:244:1::/64")]),
            vec![net("10.244.1.0/32"), net("fd00:10:244:1::/128")]
        );
        let k = FakeKernel::default();
        let own = [net("10.244.1.0/24")];
        assert!(block(apply_addresses(&k, 7, &own)).is_empty());
        assert!(block(apply_addresses(&k, 7, &own)).is_empty());
        assert_eq!(k.state().writes, vec!["address add 10.244.1.0/32 dev 7"]);
        k.state().fail_reads = true;
        assert_eq!(block(apply_addresses(&k, 7, &own)).len(), 1);
    }

    fn node_kernel() -> FakeKernel {
        let k = FakeKernel::default();
        {
            let mut s = k.state();
            for (index, name, mtu) in [
                (1, "lo", 65536),
                (2, "eth0", 9001),
                (7, "wg0", 1420),
                (8, "wgmesh-br", 1420),
            ] {
                s.links.push(Link {
                    index,
                    name: name.into(),
                    mtu,
                    up: true,
                });
            }
            for (link, a) in [
                (1, "127.0.0.1/8"),
                (2, "198.18.0.11/24"),
                (7, "10.244.1.0/32"),
                (8, "10.244.1.1/24"),
            ] {
                s.addresses.push(Address { link, net: net(a) });
            }
        }
        k
    }

    #[test]
    fn a_pass_sees_the_device_and_only_the_underlays_networks() {
        let k = node_kernel();
        let seen = block(observe(&k, "wg0", "wgmesh-br")).unwrap();
        assert_eq!(seen.device.map(|l| l.index), Some(7));
        assert_eq!(seen.on_link, vec![net("198.18.0.11/24")]);
        k.remove_link(7);
        assert_eq!(block(observe(&k, "wg0", "wgmesh-br")).unwrap().device, None);
        k.state().fail_reads = true;
        assert!(block(observe(&k, "wg0", "wgmesh-br")).is_err());
    }

    #[test]
    fn the_underlay_mtu_is_the_endpoint_links_or_1500() {
        let k = node_kernel();
        let ip = |s: &str| Some(s.parse().unwrap());
        assert_eq!(block(underlay_mtu(&k, ip("198.18.0.11"))), 9001);
        assert_eq!(block(underlay_mtu(&k, ip("198.18.0.99"))), 1500);
        assert_eq!(block(underlay_mtu(&k, None)), 1500);
        k.state().fail_reads = true;
        assert_eq!(block(underlay_mtu(&k, ip("198.18.0.11"))), 1500);
    }

    #[test]
    fn an_uninstall_removes_every_route_of_ours() {
        let k = node_kernel();
        block(apply_routes(
            &k,
            &[dev("10.244.2.0/24"), hole("10.244.0.0/16")],
            Some(7),
        ));
        assert_eq!(block(remove_owned_routes(&k, Some(7))).unwrap(), 2);
        assert!(k.state().routes.is_empty());
        assert_eq!(block(remove_owned_routes(&k, Some(7))).unwrap(), 0);
        block(apply_routes(&k, &[hole("10.244.0.0/16")], Some(7)));
        k.state().fail_writes = vec!["route del".into()];
        assert!(block(remove_owned_routes(&k, Some(7))).is_err());
    }
}
