//! The node's collect-metadata VXLAN device.

use rtnetlink::LinkMessageBuilder;
use rtnetlink::LinkVxlan;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};

use super::{Netlink, Result, link_is_up, validate_ifname};

/// What [`Netlink::ensure_vxlan`] needs an existing device to be in order to keep it.
fn vxlan_is_ours(link: &LinkMessage, port: u16) -> bool {
    let mut is_vxlan = false;
    let (mut external, mut no_learning, mut right_port) = (false, false, false);
    for attr in &link.attributes {
        let LinkAttribute::LinkInfo(infos) = attr else {
            continue;
        };
        for info in infos {
            match info {
                LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                LinkInfo::Data(InfoData::Vxlan(data)) => {
                    for d in data {
                        match d {
                            InfoVxlan::CollectMetadata(v) => external = *v,
                            InfoVxlan::Learning(v) => no_learning = !*v,
                            InfoVxlan::Port(p) => right_port = *p == port,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    is_vxlan && external && no_learning && right_port
}

fn link_mtu_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

impl Netlink {
    /// Makes sure a collect-metadata ("external") VXLAN device `name` exists with UDP
    /// destination port `port`, learning off, IPv6 off, and is up; returns its ifindex.
    ///
    /// An existing device with the right kind and settings is kept, never recreated: the
    /// datapath is attached to it and keeps forwarding across agent restarts, and recreating
    /// it would detach the programs. Only its MTU (if given) and up state are corrected. A
    /// device of that name that is anything else is deleted and created anew.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: Option<u32>) -> Result<u32> {
        validate_ifname(name)?;
        if let Some(link) = self.link_by_name(name).await? {
            let index = link.header.index;
            if vxlan_is_ours(&link, port) {
                if let Some(mtu) = mtu
                    && link_mtu_of(&link) != Some(mtu)
                {
                    tracing::info!(link = name, mtu, "correcting vxlan mtu");
                    self.set_link_mtu(index, mtu).await?;
                }
                self.disable_ipv6(name).await?;
                if !link_is_up(&link) {
                    self.set_link_up(index).await?;
                }
                tracing::debug!(link = name, index, "vxlan device already in place");
                return Ok(index);
            }
            tracing::warn!(
                link = name,
                index,
                "link exists but is not an external vxlan device on port {port} with learning off; recreating it"
            );
            self.delete_link(name).await?;
        }

        // No VNI: in external mode the VNI comes from each packet's tunnel key.
        let mut builder = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .learning(false)
            .port(port);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(self.req_err("creating vxlan device", name))?;
        let index = self.require_link_index(name).await?;
        // IPv6 off before the first up, so the device never sends router solicitations.
        let configured = async {
            self.disable_ipv6(name).await?;
            self.set_link_up(index).await
        }
        .await;
        if let Err(e) = configured {
            // A half-configured device would be kept by the next call as "ours"; remove it.
            if let Err(del) = self.delete_link(name).await {
                tracing::warn!(link = name, error = %del, "could not remove half-made vxlan device");
            }
            return Err(e);
        }
        tracing::info!(link = name, index, port, "created external vxlan device");
        Ok(index)
    }
}
