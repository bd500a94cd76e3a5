//! The guest's network settings. Every sandbox's guest has the same address, gateway and MAC, so a
//! snapshot restored behind a new network namespace needs no reconfiguration; the host side
//! (`alcove-net`) builds each namespace to match.

use std::net::Ipv4Addr;

/// The guest's address (its `eth0`).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The host's end of the link: the guest's gateway and DNS server.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Prefix length of the guest's link (a /30: the guest and its gateway).
pub const PREFIX_LEN: u8 = 30;
/// The MAC of the guest's NIC.
pub const GUEST_MAC: &str = "02:a1:c0:00:00:02";
/// The guest's interface name.
pub const GUEST_IFACE: &str = "eth0";
/// The name of the tap that is the host's end of the guest's NIC, inside the sandbox's network
/// namespace. The guest never sees it, but it is part of the VM's machine description (QEMU's
/// `ifname`) and so of every template's key.
pub const TAP: &str = "tap0";

/// The netmask of [`PREFIX_LEN`].
pub fn netmask() -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)))
}

/// The guest kernel's static network configuration (`ip=` on its command line): the guest needs
/// no DHCP client and is configured before the agent starts.
pub fn kernel_cmdline() -> String {
    format!(
        "ip={GUEST_IP}::{GATEWAY_IP}:{}::{GUEST_IFACE}:off",
        netmask()
    )
}

/// The guest's `/etc/resolv.conf`: the gateway resolves.
pub fn resolv_conf() -> String {
    format!("nameserver {GATEWAY_IP}\noptions timeout:2 attempts:2\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_settings() {
        assert_eq!(
            kernel_cmdline(),
            "ip=10.0.2.2::10.0.2.1:255.255.255.252::eth0:off"
        );
        assert_eq!(
            resolv_conf(),
            "nameserver 10.0.2.1\noptions timeout:2 attempts:2\n"
        );
    }
}
