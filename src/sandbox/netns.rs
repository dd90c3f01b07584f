//! A launched sandbox's network pieces: the names of its namespace and
//! veth pair (derived from its id, within the kernel's 15-byte limit) and
//! its MAC (derived from its address, so the rules can bind one to the
//! other before it starts).

use std::net::Ipv4Addr;

use crate::identity::MacAddr;

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sb-").unwrap_or(id);
    &hex[..hex.len().min(10)]
}

pub fn netns_name(id: &str) -> String {
    format!("sl-{}", short_id(id))
}

/// Interface names are at most 15 bytes.
/// The MAC a launched sandbox's `eth0` gets: locally administered,
/// unicast, and derived from its address, so the rules can bind one to
/// the other before the sandbox starts.
pub fn sandbox_mac(ip: Ipv4Addr) -> MacAddr {
    let [a, b, c, d] = ip.octets();
    MacAddr([0x02, 0x53, a, b, c, d])
}

pub fn host_veth_name(id: &str) -> String {
    format!("slv{}", short_id(id))
}

pub(crate) fn peer_veth_name(id: &str) -> String {
    format!("slp{}", short_id(id))
}
