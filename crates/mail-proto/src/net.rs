//! Client addresses as every decision and record sees them.

use std::net::IpAddr;

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, what a `[::]` listener reports for an
/// IPv4 client) is its IPv4 address (SPEC R4): lists, RBL queries, POP records, journal.
pub fn normalise_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv6_is_ipv4() {
        let ip: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(normalise_ip(ip), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(normalise_ip(v6), v6);
    }
}
