//! Property test of the DHCP request handler through the public API: whatever bytes arrive, `respond` never
//! panics, and whatever it answers is a well-formed reply for the one configured MAC. Runs in a debug build,
//! where `dhcproto`'s own `debug_assert!`s and integer underflows would fire if unscreened input reached them.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use rand::{Rng, SeedableRng};
use tapmanager_core::dhcp::{respond, BridgeBinding, Lease, Outcome};

const MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e];
const SERVER: Ipv4Addr = Ipv4Addr::new(169, 254, 254, 2);

fn binding() -> BridgeBinding {
    BridgeBinding {
        bridge: "br0".into(),
        leases: vec![Lease {
            mac: tapmanager_core::types::MacAddr(MAC),
            address: "10.1.90.5/24".parse().unwrap(),
            mtu: 1500,
            routers: vec![Ipv4Addr::new(10, 1, 90, 1)],
            classless_routes: vec![],
            dns: vec![Ipv4Addr::new(8, 8, 8, 8)],
            search: vec!["svc.cluster.local".into()],
            lease_time: 86400,
            renewal_time: 43200,
            rebinding_time: 64800,
        }],
    }
}

fn header(kind: MessageType) -> Vec<u8> {
    let mut m = Message::default();
    m.set_chaddr(&MAC);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b.truncate(240); // fixed header + magic cookie, options follow
    b
}

fn check(out: &Outcome) {
    if let Outcome::Reply { kind, bytes } = out {
        let m = Message::decode(&mut Decoder::new(bytes)).expect("our reply decodes");
        assert_eq!(m.opts().msg_type(), Some(*kind));
        assert_eq!(m.chaddr(), MAC);
        assert!(matches!(kind, MessageType::Offer | MessageType::Ack | MessageType::Nak));
    }
}

#[test]
fn random_options_never_panic() {
    let b = binding();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd4c9_0003);
    let mut replies = 0;
    let headers = [header(MessageType::Discover), header(MessageType::Request)];
    for n in 0..40_000u32 {
        let mut p = headers[(n % 2) as usize].clone();
        // a message type first (so the packet gets far), then random TLVs with any code and length,
        // sometimes lying about the length, sometimes with RFC 3396 repeats of the same code
        p.extend_from_slice(&[53, 1, if n % 2 == 0 { 1 } else { 3 }]);
        for _ in 0..rng.random_range(0..12) {
            let code: u8 = if rng.random_bool(0.3) {
                [50, 53, 54, 55, 61, 97, 81, 80, 94, 151, 121, 119][rng.random_range(0..12)]
            } else {
                rng.random()
            };
            let len: u8 = if rng.random_bool(0.5) { rng.random_range(0..6) } else { rng.random() };
            p.push(code);
            p.push(len);
            let actual = if rng.random_bool(0.9) { len as usize } else { rng.random_range(0..300) };
            for _ in 0..actual {
                p.push(rng.random());
            }
        }
        if rng.random_bool(0.5) {
            p.push(255);
        }
        if rng.random_bool(0.2) {
            let cut = rng.random_range(0..p.len());
            p.truncate(cut);
        }
        let out = respond(&b, SERVER, &p);
        check(&out);
        if matches!(out, Outcome::Reply { .. }) {
            replies += 1;
        }
    }
    assert!(replies > 500, "the fuzzer reaches the reply path ({replies} replies)");
}

#[test]
fn every_truncation_of_a_valid_request_is_safe() {
    let b = binding();
    let mut m = Message::default();
    m.set_chaddr(&MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 5)));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    m.opts_mut().insert(DhcpOption::ClientIdentifier(vec![1, 0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e]));
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![1.into(), 3.into(), 121.into()]));
    let mut full = Vec::new();
    m.encode(&mut Encoder::new(&mut full)).unwrap();
    assert!(matches!(respond(&b, SERVER, &full), Outcome::Reply { kind: MessageType::Ack, .. }));
    for cut in 0..full.len() {
        let out = respond(&b, SERVER, &full[..cut]);
        check(&out);
        if cut < 240 {
            assert!(matches!(out, Outcome::Ignored(_)), "cut at {cut}");
        }
    }
    // every single-byte corruption too
    for i in 0..full.len() {
        for v in [0u8, 1, 0x7f, 0x80, 0xff] {
            let mut p = full.clone();
            p[i] = v;
            check(&respond(&b, SERVER, &p));
        }
    }
}
