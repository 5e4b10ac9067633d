//! The agent's netlink shell: routes it owns (marked with its own route protocol number, so
//! it never touches anyone else's), the address on the WireGuard interface, and what it
//! needs to know about links. Reads and writes only; the decisions are `wgmesh_core::topology`.

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::IpAddr;
use wgmesh_core::topology::{NextHop, Route};

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{op}: {source}")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} does not exist")]
    NoSuchLink(String),
}

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

/// A link as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
}

/// An address with its prefix, on a link.
#[derive(Debug, Clone, Copy)]
pub struct Address {
    pub link: u32,
    pub net: IpNet,
}

/// A netlink connection in the agent's network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    protocol: u8,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Netlink {
    /// Connects; `protocol` marks every route the agent installs.
    pub fn connect(protocol: u8) -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle, protocol })
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing links"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut link = Link {
                    index: m.header.index,
                    name: String::new(),
                    mtu: 0,
                    up: m.header.flags.contains(LinkFlags::Up),
                };
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    /// The link named `name`.
    pub async fn link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.links()
            .await?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))
    }

    /// Sets the MTU of the link with index `index`.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(req(format!("setting the MTU of link {index} to {mtu}")))
    }

    /// Deletes the link named `name`; a link that does not exist is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(link) = self.links().await?.into_iter().find(|l| l.name == name) else {
            return Ok(());
        };
        self.handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(req(format!("deleting link {name}")))
    }

    /// Every address, with its prefix length.
    pub async fn addresses(&self) -> Result<Vec<Address>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                let net = IpNet::new(ip, m.header.prefix_len).ok()?;
                Some(Address {
                    link: m.header.index,
                    net,
                })
            })
            .collect())
    }

    /// Makes `addr` (a host address) present on link `index`.
    pub async fn ensure_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let present = self
            .addresses()
            .await?
            .iter()
            .any(|a| a.link == index && a.net == addr);
        if present {
            return Ok(());
        }
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(req(format!("adding address {addr}")))
    }

    /// The routes this agent owns (its protocol), in the main table, both families.
    pub async fn owned_routes(
        &self,
        device_index: Option<u32>,
    ) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(req("listing routes"))?;
            out.extend(
                msgs.iter()
                    .filter(|m| m.header.protocol == RouteProtocol::Other(self.protocol))
                    .filter_map(|m| to_route(m, device_index)),
            );
        }
        out.sort();
        Ok(out)
    }

    fn message(&self, route: &Route, device_index: Option<u32>) -> Option<RouteMessage> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dst.addr(), route.dst.prefix_len())
            .ok()?
            .protocol(RouteProtocol::Other(self.protocol))
            .priority(route.metric);
        match route.via {
            NextHop::Device => b = b.output_interface(device_index?),
            NextHop::Gateway(gw) => b = b.gateway(gw).ok()?,
            NextHop::Blackhole => b = b.kind(RouteType::BlackHole),
        }
        Some(b.build())
    }

    /// Installs `route` (replacing one with the same key). `device_index` is required for
    /// routes through the device.
    pub async fn add_route(
        &self,
        route: &Route,
        device_index: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let Some(msg) = self.message(route, device_index) else {
            return Ok(());
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "adding route {} via {:?}",
                route.dst, route.via
            )))
    }

    /// Removes `route`; a route that is already gone is not an error.
    pub async fn del_route(
        &self,
        route: &Route,
        device_index: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let Some(msg) = self.message(route, device_index) else {
            return Ok(());
        };
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: format!("deleting route {} via {:?}", route.dst, route.via),
                source,
            }),
        }
    }
}

fn to_route(m: &RouteMessage, device_index: Option<u32>) -> Option<Route> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match m.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    let via = if m.header.kind == RouteType::BlackHole {
        NextHop::Blackhole
    } else if let Some(gw) = gateway {
        NextHop::Gateway(gw)
    } else if oif.is_some() && oif == device_index {
        NextHop::Device
    } else {
        // A route of ours through a device that is gone or was replaced: report it as
        // through the device with a metric no plan uses, so the diff removes it.
        return Some(Route {
            dst,
            via: NextHop::Device,
            metric: u32::MAX,
        });
    };
    Some(Route { dst, via, metric })
}
