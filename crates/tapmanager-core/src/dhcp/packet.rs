//! DHCP packets: parsing a client's request and building our reply, with `dhcproto`.
//!
//! Requests are screened before `dhcproto` sees them: the fixed header must be a well-formed Ethernet
//! BOOTREQUEST (`htype` 1, `hlen` 6, magic cookie) and only the options the server reads (53, 50, 54, 55, 61,
//! 97) are passed on. `dhcproto` 0.14 panics on some malformed input: `Message::chaddr()` slices by an
//! unchecked `hlen` (> 16 panics), and several option decoders underflow or `debug_assert!` on short lengths
//! (81 client FQDN, 80, 94, 151-155). Nothing here panics on any input (fuzzed in the tests below and in
//! `tests/dhcp_fuzz.rs`).

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder, Name};

use super::lease::BridgeBinding;
use crate::types::MacAddr;

/// Length of the fixed BOOTP header (without the magic cookie).
const HEADER_LEN: usize = 236;
/// RFC 2131 magic cookie.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The options a request may carry that the server reads.
const READ_OPTIONS: [u8; 6] = [50, 53, 54, 55, 61, 97];

/// What the server does with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes (broadcast to port 68). `kind` is OFFER, ACK or NAK.
    Reply {
        /// The reply's message type.
        kind: MessageType,
        /// The encoded reply.
        bytes: Vec<u8>,
    },
    /// No answer, and why.
    Ignored(&'static str),
}

/// A screened request: the fields the server uses.
#[derive(Debug, Clone)]
pub struct Request {
    /// The decoded message (screened options only).
    pub msg: Message,
    /// The client MAC (`chaddr`, `hlen` 6).
    pub mac: MacAddr,
}

/// Screens and decodes a request; `Err` says why it is not one we read.
pub fn parse_request(bytes: &[u8]) -> Result<Request, &'static str> {
    if bytes.len() < HEADER_LEN + MAGIC.len() {
        return Err("too short for a DHCP message");
    }
    if bytes[0] != 1 {
        return Err("not a BOOTREQUEST");
    }
    if bytes[1] != 1 || bytes[2] != 6 {
        return Err("not an Ethernet client (htype 1, hlen 6)");
    }
    if bytes[HEADER_LEN..HEADER_LEN + 4] != MAGIC {
        return Err("bad magic cookie");
    }
    let mac = MacAddr::from_bytes(&bytes[28..34]).map_err(|_| "bad chaddr")?;

    // Rebuild the options with only what we read; concatenated long options (RFC 3396) stay in order.
    let mut clean = Vec::with_capacity(bytes.len());
    clean.extend_from_slice(&bytes[..HEADER_LEN + 4]);
    let mut i = HEADER_LEN + 4;
    while i < bytes.len() {
        let code = bytes[i];
        match code {
            0 => i += 1,
            255 => break,
            _ => {
                let Some(&len) = bytes.get(i + 1) else { break };
                let end = i + 2 + len as usize;
                if end > bytes.len() {
                    break; // truncated option: ignore it and what follows
                }
                if READ_OPTIONS.contains(&code) {
                    clean.extend_from_slice(&bytes[i..end]);
                }
                i = end;
            }
        }
    }
    clean.push(255);
    let msg = Message::decode(&mut Decoder::new(&clean)).map_err(|_| "undecodable DHCP message")?;
    Ok(Request { msg, mac })
}

/// Answers one datagram received on `binding`'s bridge. Pure: no I/O.
///
/// DISCOVER -> OFFER, REQUEST of our address -> ACK, REQUEST of another address -> NAK, a REQUEST for another
/// server (option 54 not ours) and everything else (unknown MAC, no MTU, other message types, garbage) ->
/// ignored.
pub fn respond(binding: &BridgeBinding, server_ip: Ipv4Addr, bytes: &[u8]) -> Outcome {
    let req = match parse_request(bytes) {
        Ok(r) => r,
        Err(why) => return Outcome::Ignored(why),
    };
    let Some(lease) = binding.leases.iter().find(|l| l.mac == req.mac) else {
        return Outcome::Ignored("unknown client MAC");
    };
    if lease.mtu == 0 {
        return Outcome::Ignored("no MTU known for this interface");
    }
    let opts = req.msg.opts();
    let kind = match opts.msg_type() {
        Some(MessageType::Discover) => MessageType::Offer,
        Some(MessageType::Request) => {
            if let Some(DhcpOption::ServerIdentifier(sid)) = opts.get(OptionCode::ServerIdentifier) {
                if *sid != server_ip {
                    return Outcome::Ignored("REQUEST for another server");
                }
            }
            let requested = match opts.get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
                _ if !req.msg.ciaddr().is_unspecified() => Some(req.msg.ciaddr()),
                _ => None,
            };
            match requested {
                None => return Outcome::Ignored("REQUEST without an address"),
                Some(ip) if ip == lease.address.addr() => MessageType::Ack,
                Some(_) => MessageType::Nak,
            }
        }
        Some(_) => return Outcome::Ignored("message type not served"),
        None => return Outcome::Ignored("no message type"),
    };

    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(req.msg.xid())
        .set_flags(Flags::new(u16::from(req.msg.flags())))
        .set_giaddr(req.msg.giaddr())
        .set_chaddr(&req.mac.octets());
    let mut o = DhcpOptions::new();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(server_ip));
    for code in [OptionCode::ClientIdentifier, OptionCode::ClientMachineIdentifier] {
        if let Some(id) = opts.get(code) {
            o.insert(id.clone());
        }
    }
    if kind != MessageType::Nak {
        reply.set_yiaddr(lease.address.addr());
        o.insert(DhcpOption::SubnetMask(lease.address.netmask()));
        o.insert(DhcpOption::InterfaceMtu(lease.mtu));
        o.insert(DhcpOption::AddressLeaseTime(lease.lease_time));
        o.insert(DhcpOption::Renewal(lease.renewal_time));
        o.insert(DhcpOption::Rebinding(lease.rebinding_time));
        o.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
        if !lease.classless_routes.is_empty() {
            o.insert(DhcpOption::ClasslessStaticRoute(lease.classless_routes.clone()));
        } else if !lease.routers.is_empty() {
            o.insert(DhcpOption::Router(lease.routers.clone()));
        }
        let names: Vec<Name> = lease.search.iter().filter_map(|s| Name::from_ascii(s).ok()).collect();
        if !names.is_empty() {
            o.insert(DhcpOption::DomainSearch(names));
        }
    }
    reply.set_opts(o);
    let mut bytes = Vec::with_capacity(512);
    if reply.encode(&mut Encoder::new(&mut bytes)).is_err() {
        return Outcome::Ignored("reply could not be encoded");
    }
    // BOOTP minimum size (some clients drop shorter replies).
    if bytes.len() < 300 {
        bytes.resize(300, 0);
    }
    Outcome::Reply { kind, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::lease::Lease;
    use ipnet::Ipv4Net;
    use rand::{Rng, SeedableRng};

    pub(crate) fn binding() -> BridgeBinding {
        BridgeBinding {
            bridge: "br0".into(),
            leases: vec![Lease {
                mac: "42:a4:a6:22:80:2e".parse().unwrap(),
                address: "10.1.90.5/24".parse().unwrap(),
                mtu: 9000,
                routers: vec![],
                classless_routes: vec![
                    ("10.10.42.0/24".parse().unwrap(), Ipv4Addr::new(10, 1, 90, 90)),
                    ("0.0.0.0/0".parse::<Ipv4Net>().unwrap(), Ipv4Addr::new(10, 1, 90, 1)),
                ],
                dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
                search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
                lease_time: 86400,
                renewal_time: 43200,
                rebinding_time: 64800,
            }],
        }
    }

    fn request(kind: MessageType, mac: [u8; 6], extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::default();
        m.set_chaddr(&mac).set_xid(0x1234_5678);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for opt in extra {
            m.opts_mut().insert(opt);
        }
        let mut b = Vec::new();
        m.encode(&mut Encoder::new(&mut b)).unwrap();
        b
    }

    const MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e];

    fn decode(o: &Outcome) -> Message {
        match o {
            Outcome::Reply { bytes, .. } => Message::decode(&mut Decoder::new(bytes)).unwrap(),
            Outcome::Ignored(why) => panic!("ignored: {why}"),
        }
    }

    #[test]
    fn offer_has_every_option() {
        let id = DhcpOption::ClientIdentifier(vec![1, 0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e]);
        let uuid = DhcpOption::ClientMachineIdentifier(vec![0; 17]);
        let out = respond(
            &binding(),
            Ipv4Addr::new(169, 254, 254, 2),
            &request(MessageType::Discover, MAC, vec![id.clone(), uuid.clone()]),
        );
        let m = decode(&out);
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.xid(), 0x1234_5678);
        assert_eq!(m.chaddr(), MAC);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 1, 90, 5));
        let o = m.opts();
        assert_eq!(o.msg_type(), Some(MessageType::Offer));
        assert_eq!(o.get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0))));
        assert_eq!(o.get(OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(9000)));
        assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(86400)));
        assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(43200)));
        assert_eq!(o.get(OptionCode::Rebinding), Some(&DhcpOption::Rebinding(64800)));
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(169, 254, 254, 2)))
        );
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 96, 0, 10)]))
        );
        assert!(o.get(OptionCode::Router).is_none(), "option 3 left out when 121 is present");
        assert_eq!(o.get(OptionCode::ClientIdentifier), Some(&id));
        assert_eq!(o.get(OptionCode::ClientMachineIdentifier), Some(&uuid));
        let Some(DhcpOption::DomainSearch(names)) = o.get(OptionCode::DomainSearch) else { panic!("no 119") };
        assert_eq!(
            names.iter().map(|n| n.to_ascii()).collect::<Vec<_>>(),
            ["default.svc.cluster.local.", "cluster.local."]
        );
        // RFC 3442 bytes of option 121: 24 10.10.42 gw 10.1.90.90, 0 gw 10.1.90.1
        let Outcome::Reply { bytes, .. } = &out else { unreachable!() };
        let want121 = [121u8, 13, 24, 10, 10, 42, 10, 1, 90, 90, 0, 10, 1, 90, 1];
        assert!(bytes.windows(want121.len()).any(|w| w == want121), "option 121 bytes");
        // RFC 3397 bytes of option 119: the second name points at "cluster" in the first (offset 12)
        let mut want119 = vec![119u8, 29];
        for label in ["default", "svc", "cluster", "local"] {
            want119.push(label.len() as u8);
            want119.extend_from_slice(label.as_bytes());
        }
        want119.extend_from_slice(&[0, 0xc0, 12]);
        assert!(bytes.windows(want119.len()).any(|w| *w == want119[..]), "option 119 bytes: {bytes:?}");
    }

    #[test]
    fn router_only_when_no_classless() {
        let mut b = binding();
        b.leases[0].classless_routes.clear();
        b.leases[0].routers = vec![Ipv4Addr::new(10, 1, 90, 1)];
        b.leases[0].search.clear();
        let m = decode(&respond(&b, Ipv4Addr::new(169, 254, 254, 2), &request(MessageType::Discover, MAC, vec![])));
        assert_eq!(m.opts().get(OptionCode::Router), Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 1, 90, 1)])));
        assert!(m.opts().get(OptionCode::ClasslessStaticRoute).is_none());
        assert!(m.opts().get(OptionCode::DomainSearch).is_none());
        assert!(m.opts().get(OptionCode::ClientIdentifier).is_none());
    }

    #[test]
    fn request_ack_nak_and_ignores() {
        let sid = Ipv4Addr::new(169, 254, 254, 2);
        let b = binding();
        let ours = DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 5));
        let other = DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 77));
        let m = decode(&respond(
            &b,
            sid,
            &request(MessageType::Request, MAC, vec![ours.clone(), DhcpOption::ServerIdentifier(sid)]),
        ));
        assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 1, 90, 5));
        let out = respond(&b, sid, &request(MessageType::Request, MAC, vec![other]));
        let m = decode(&out);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(m.opts().get(OptionCode::SubnetMask).is_none());
        assert_eq!(m.opts().get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(sid)));
        // renewing: ciaddr carries the address
        let mut renew = Message::default();
        renew.set_chaddr(&MAC).set_ciaddr(Ipv4Addr::new(10, 1, 90, 5));
        renew.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
        let mut bytes = Vec::new();
        renew.encode(&mut Encoder::new(&mut bytes)).unwrap();
        assert_eq!(decode(&respond(&b, sid, &bytes)).opts().msg_type(), Some(MessageType::Ack));

        let cases = [
            (request(MessageType::Discover, [2, 0, 0, 0, 0, 1], vec![]), "unknown client MAC"),
            (
                request(
                    MessageType::Request,
                    MAC,
                    vec![ours.clone(), DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1))],
                ),
                "REQUEST for another server",
            ),
            (request(MessageType::Request, MAC, vec![]), "REQUEST without an address"),
            (request(MessageType::Release, MAC, vec![]), "message type not served"),
            (vec![1; 100], "too short for a DHCP message"),
        ];
        for (bytes, why) in cases {
            assert_eq!(respond(&b, sid, &bytes), Outcome::Ignored(why));
        }
        let mut nomtu = binding();
        nomtu.leases[0].mtu = 0;
        assert_eq!(
            respond(&nomtu, sid, &request(MessageType::Discover, MAC, vec![])),
            Outcome::Ignored("no MTU known for this interface")
        );
    }

    #[test]
    fn inputs_that_panic_dhcproto_are_screened() {
        let sid = Ipv4Addr::new(169, 254, 254, 2);
        // hlen 200: dhcproto's chaddr() would slice out of bounds
        let mut bytes = request(MessageType::Discover, MAC, vec![]);
        bytes[2] = 200;
        assert_eq!(respond(&binding(), sid, &bytes), Outcome::Ignored("not an Ethernet client (htype 1, hlen 6)"));
        // option 81 (client FQDN) with length 1 and 151 with length 0: dhcproto underflows `len - 3` / `len - 1`
        for opt in [&[81u8, 1, 0][..], &[151, 0], &[80, 3, 1, 2, 3], &[94, 1, 1], &[152, 1, 1]] {
            let mut bytes = request(MessageType::Discover, MAC, vec![]);
            let end = bytes.iter().rposition(|&b| b == 255).unwrap();
            bytes.splice(end..end, opt.iter().copied());
            assert!(matches!(respond(&binding(), sid, &bytes), Outcome::Reply { kind: MessageType::Offer, .. }));
        }
    }

    /// Random, truncated and bit-flipped packets never panic (run without catch_unwind).
    #[test]
    fn fuzz_never_panics() {
        let sid = Ipv4Addr::new(169, 254, 254, 2);
        let b = binding();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a9_d4c9);
        let seeds = [
            request(MessageType::Discover, MAC, vec![DhcpOption::ClientIdentifier(vec![1, 2, 3])]),
            request(MessageType::Request, MAC, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 5))]),
        ];
        for n in 0..100_000u32 {
            let mut p = seeds[(n % 2) as usize].clone();
            match n % 4 {
                0 => p.truncate(rng.random_range(0..p.len())),
                1 => {
                    for _ in 0..rng.random_range(1..8) {
                        let i = rng.random_range(0..p.len());
                        p[i] = rng.random();
                    }
                }
                2 => {
                    // random option soup after a valid header
                    p.truncate(240);
                    for _ in 0..rng.random_range(0..40) {
                        p.push(rng.random());
                    }
                }
                _ => p = (0..rng.random_range(0..600)).map(|_| rng.random()).collect(),
            }
            let _ = respond(&b, sid, &p);
        }
    }
}
