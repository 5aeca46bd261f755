//! Who the client is: the socket's peer, or what a trusted proxy in front of keygate says.
//!
//! The address a request is charged to (brute-force limiting, the upstream's
//! `X-Forwarded-For`) is the TCP peer, unless that peer is in `[server] trusted_proxies`. Only
//! then is the header those proxies write read (`[server] client_ip_header`: `X-Forwarded-For`,
//! or `Forwarded: for=`; one of them, as nginx's `real_ip_header`), right to left: the first
//! address that is not itself a trusted proxy is the client. A client that writes its own
//! header therefore cannot choose its address: an untrusted peer's headers are never read, a
//! trusted proxy appends the real peer to whatever the client sent, and the other header,
//! which such a proxy passes on untouched, is not read at all.
//!
//! With `[server] proxy_protocol = true`, a connection from a trusted peer must start with a
//! PROXY protocol v2 header ([`read_proxy_v2`]); its source address is the client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{header::HeaderName, HeaderMap};
use tokio::io::{AsyncRead, AsyncReadExt};

/// An address block such as `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR block like \"10.0.0.0/8\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; other addresses unchanged.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `[server] client_ip_header`: which header the trusted proxies write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For` (the default; nginx, HAProxy `option forwardfor`, AWS ALB, Envoy).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=` (RFC 7239; HAProxy `option forwarded`).
    Forwarded,
}

impl ClientIpHeader {
    /// Parses `"x-forwarded-for"` or `"forwarded"` (any case).
    pub fn parse(s: &str) -> Result<ClientIpHeader, String> {
        if s.eq_ignore_ascii_case("x-forwarded-for") {
            Ok(ClientIpHeader::XForwardedFor)
        } else if s.eq_ignore_ascii_case("forwarded") {
            Ok(ClientIpHeader::Forwarded)
        } else {
            Err(format!(
                "client_ip_header must be \"x-forwarded-for\" or \"forwarded\", not {s:?}"
            ))
        }
    }
}

/// `[server] trusted_proxies`: the peers whose forwarding header is believed, and which header
/// that is.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    blocks: Vec<Cidr>,
    header: ClientIpHeader,
}

impl TrustedProxies {
    /// The list as configured, reading `X-Forwarded-For`.
    pub fn new(blocks: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies {
            blocks,
            header: ClientIpHeader::default(),
        }
    }

    /// The same proxies, read through `header`.
    pub fn reading(self, header: ClientIpHeader) -> TrustedProxies {
        TrustedProxies { header, ..self }
    }

    /// Whether the connection's peer is one of these proxies, whose forwarding fields
    /// (`Forwarded`, `X-Real-IP`, `X-Forwarded-Client-Cert`, …) go upstream as it wrote them;
    /// a client's own stay behind.
    pub fn trusts_peer(&self, peer: IpAddr) -> bool {
        !self.blocks.is_empty() && self.contains(canonical(peer))
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|c| c.contains(ip))
    }

    /// Whether no proxy is trusted (forwarding headers are never read).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The client's address for a request that arrived from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut chain = forwarded_chain(headers, self.header);
        // Right to left: skip our own proxies; the first other hop is the client. A value that
        // does not parse ends the walk (whatever is left of it was written by the client).
        let mut client = peer;
        while let Some(hop) = chain.pop() {
            match hop {
                Some(ip) if self.contains(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
        client
    }
}

/// `X-Forwarded-For`, read here and extended on the way upstream ([`crate::proxy`]).
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The hops of `header`, left to right; `None` for a hop that is not an address (`unknown`,
/// an obfuscated name, garbage).
fn forwarded_chain(headers: &HeaderMap, header: ClientIpHeader) -> Vec<Option<IpAddr>> {
    // Split on the raw bytes: a proxy appends its hop to whatever the client sent, so one
    // non-ASCII byte in the client's part must spoil that hop only, not the proxy's after it.
    let elements = |name, unreadable| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(move |hop| std::str::from_utf8(hop).unwrap_or(unreadable))
    };
    match header {
        ClientIpHeader::XForwardedFor => elements(&X_FORWARDED_FOR, "?")
            .map(|hop| parse_hop(hop.trim()))
            .collect(),
        ClientIpHeader::Forwarded => elements(&http::header::FORWARDED, "for=?")
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_hop(v.trim().trim_matches('"')))
                })
            })
            .collect(),
    }
}

/// One hop: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = s.strip_prefix('[')?.split(']').next()?;
    inner
        .parse::<Ipv6Addr>()
        .ok()
        .map(|v6| canonical(IpAddr::V6(v6)))
}

/// The 12-byte signature that opens a PROXY protocol v2 header.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Why a PROXY protocol v2 header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection did not start with the v2 signature, or the header is malformed.
    #[error("not a PROXY protocol v2 header: {0}")]
    Malformed(&'static str),
    /// Reading the header failed.
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a PROXY protocol v2 header from the start of `io`. Returns the client's address
/// (`Some`) for a proxied TCP connection, `None` for a `LOCAL` one (the proxy's own health
/// check) or an address family other than TCP over IPv4/IPv6. Reads exactly the header's
/// bytes, nothing of the request after it.
pub async fn read_proxy_v2<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    io.read_exact(&mut head).await?;
    if head[..12] != PROXY_V2_SIGNATURE {
        return Err(ProxyHeaderError::Malformed("bad signature"));
    }
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(ProxyHeaderError::Malformed("version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut rest = vec![0u8; len];
    io.read_exact(&mut rest).await?;
    match command {
        0 => return Ok(None),
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    }
    let addr = match head[13] {
        // TCP over IPv4: src addr, dst addr, src port, dst port.
        0x11 if len >= 12 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([rest[8], rest[9]]))
        }
        // TCP over IPv6.
        0x21 if len >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&rest[..16]);
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([rest[32], rest[33]]),
            )
        }
        0x11 | 0x21 => return Err(ProxyHeaderError::Malformed("address block too short")),
        _ => return Ok(None),
    };
    Ok(Some(addr))
}

/// Encodes a PROXY protocol v2 `PROXY` header for a TCP connection from `src` to `dst`
/// (used by tests and the soak script to play a load balancer).
pub fn encode_proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = PROXY_V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| Cidr::parse(s).unwrap()).collect())
    }

    #[test]
    fn cidr_blocks_match_their_addresses_only() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains(ip("2001:db8:1::5")));
        assert!(!Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains(ip("10.0.0.1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }

    #[test]
    fn headers_of_an_untrusted_peer_are_ignored() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(t.client_ip(ip("192.0.2.7"), &h), ip("192.0.2.7"));
    }

    #[test]
    fn a_trusted_peer_is_walked_right_to_left_past_trusted_hops() {
        let t = trusted(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        // The client forged the first hop; our proxies appended the real one and themselves.
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // Nothing but proxies: the leftmost proxy.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.9.9.9"));
        // No header: the peer itself.
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the last trusted hop.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    /// One header is read, the configured one: a proxy writing `Forwarded` passes a client's
    /// `X-Forwarded-For` on untouched, and the other way round.
    #[test]
    fn only_the_configured_header_is_read() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::FORWARDED,
            HeaderValue::from_static(r#"for=192.0.2.60;proto=http, for="[2001:db8::7]:4711""#),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let forwarded = trusted(&["127.0.0.1"]).reading(ClientIpHeader::Forwarded);
        assert_eq!(forwarded.client_ip(ip("127.0.0.1"), &h), ip("2001:db8::7"));
        let xff = trusted(&["127.0.0.1"]);
        assert_eq!(xff.client_ip(ip("127.0.0.1"), &h), ip("6.6.6.6"));
        h.remove("x-forwarded-for");
        assert_eq!(xff.client_ip(ip("127.0.0.1"), &h), ip("127.0.0.1"));
        assert_eq!(
            ClientIpHeader::parse("Forwarded"),
            Ok(ClientIpHeader::Forwarded)
        );
        assert!(ClientIpHeader::parse("x-real-ip").is_err());
    }

    #[tokio::test]
    async fn proxy_v2_headers_round_trip_and_leave_the_request_unread() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut bytes = encode_proxy_v2(src, dst);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut r = &bytes[..];
        assert_eq!(read_proxy_v2(&mut r).await.unwrap(), Some(src));
        assert_eq!(r, b"GET / HTTP/1.1\r\n");

        let src6: SocketAddr = "[2001:db8::9]:1".parse().unwrap();
        let bytes = encode_proxy_v2(src6, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(read_proxy_v2(&mut &bytes[..]).await.unwrap(), Some(src6));

        let mut r = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        assert!(matches!(
            read_proxy_v2(&mut r).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
