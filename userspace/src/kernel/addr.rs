//! Conversions between std socket addresses and the kernel's 16-byte form.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portcullis_common::{is_v4_mapped, v4_mapped};

/// An address as the kernel programs store it: IPv4 in mapped form.
pub fn to_kernel(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Back from the kernel form: mapped addresses become plain IPv4.
pub fn from_kernel(addr: [u8; 16]) -> IpAddr {
    if is_v4_mapped(&addr) {
        IpAddr::V4([addr[12], addr[13], addr[14], addr[15]].into())
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

/// A socket address with its IP normalised (`::ffff:1.2.3.4` becomes `1.2.3.4`).
pub fn normalise(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(from_kernel(to_kernel(addr.ip())), addr.port())
}

/// A NUL-padded command name.
pub fn comm_to_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_through_mapped_form() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let k = to_kernel(ip);
        assert_eq!(&k[10..], &[0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(from_kernel(k), ip);
    }

    #[test]
    fn mapped_v6_socket_address_is_normalised() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(normalise(a), "127.0.0.1:80".parse::<SocketAddr>().unwrap());
        let b: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(normalise(b), b);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        assert_eq!(comm_to_string(&c), "curl");
    }
}
