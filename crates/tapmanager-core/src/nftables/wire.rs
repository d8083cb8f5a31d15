//! The nf_tables netlink encoding: constants, attributes (TLVs), expressions, messages and batches, built on
//! `netlink-packet-core`'s [`Nla`] and [`NetlinkMessage`]. Pure bytes, no socket: unit-tested without root.
//!
//! The constants come from `linux/netfilter/nfnetlink.h`, `linux/netfilter/nf_tables.h` and
//! `linux/netfilter_bridge.h`. Every nf_tables message is a netlink header, a 4-byte `nfgenmsg`
//! (family, version 0, resource id in network byte order) and attributes.

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, Nla, NlasIterator, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST,
};

pub use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

/// The nf_tables subsystem of nfnetlink.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

/// nf_tables message types (`enum nf_tables_msg_types`).
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;

/// The `bridge` family.
pub const NFPROTO_BRIDGE: u8 = 7;

pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_META_OIFNAME: u32 = 7;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
/// The `accept` verdict (a chain policy).
pub const NF_ACCEPT: u32 = 1;
/// Bridge hooks (`linux/netfilter_bridge.h`).
pub const NF_BR_FORWARD: u32 = 2;
pub const NF_BR_LOCAL_OUT: u32 = 3;
/// `priority filter` of a bridge chain.
pub const NF_BR_PRI_FILTER_BRIDGED: i32 = -200;

/// One netlink attribute: bytes, or nested attributes (`NLA_F_NESTED` set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// A value attribute.
    Bytes(u16, Vec<u8>),
    /// A nested attribute.
    Nested(u16, Vec<Attr>),
}

impl Attr {
    /// A NUL-terminated string.
    pub fn str(kind: u16, s: &str) -> Attr {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        Attr::Bytes(kind, v)
    }

    /// A 32-bit value in network byte order (what nf_tables expects of every number).
    pub fn be32(kind: u16, v: u32) -> Attr {
        Attr::Bytes(kind, v.to_be_bytes().to_vec())
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Bytes(_, v) => v.len(),
            Attr::Nested(_, inner) => inner.as_slice().buffer_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Attr::Bytes(k, _) => *k,
            Attr::Nested(k, _) => *k | NLA_F_NESTED,
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Attr::Bytes(_, v) => buffer.copy_from_slice(v),
            Attr::Nested(_, inner) => inner.as_slice().emit(buffer),
        }
    }
}

// ---- expressions (`NFTA_LIST_ELEM` entries of `NFTA_RULE_EXPRESSIONS`) ----

fn expr(name: &str, data: Option<Vec<Attr>>) -> Attr {
    let mut e = vec![Attr::str(NFTA_EXPR_NAME, name)];
    if let Some(d) = data {
        e.push(Attr::Nested(NFTA_EXPR_DATA, d));
    }
    Attr::Nested(NFTA_LIST_ELEM, e)
}

/// `meta load <key> => reg 1`.
pub fn meta_load(key: u32) -> Attr {
    expr("meta", Some(vec![Attr::be32(NFTA_META_DREG, NFT_REG_1), Attr::be32(NFTA_META_KEY, key)]))
}

/// `cmp eq reg 1 <value>`.
pub fn cmp_eq(value: &[u8]) -> Attr {
    expr(
        "cmp",
        Some(vec![
            Attr::be32(NFTA_CMP_SREG, NFT_REG_1),
            Attr::be32(NFTA_CMP_OP, NFT_CMP_EQ),
            Attr::Nested(NFTA_CMP_DATA, vec![Attr::Bytes(NFTA_DATA_VALUE, value.to_vec())]),
        ]),
    )
}

/// `payload load <len>b @ transport header + <offset> => reg 1`.
pub fn transport_load(offset: u32, len: u32) -> Attr {
    expr(
        "payload",
        Some(vec![
            Attr::be32(NFTA_PAYLOAD_DREG, NFT_REG_1),
            Attr::be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER),
            Attr::be32(NFTA_PAYLOAD_OFFSET, offset),
            Attr::be32(NFTA_PAYLOAD_LEN, len),
        ]),
    )
}

/// `counter`.
pub fn counter() -> Attr {
    expr("counter", None)
}

/// `immediate reg 0 drop`.
pub fn verdict_drop() -> Attr {
    let verdict = Attr::Nested(NFTA_DATA_VERDICT, vec![Attr::be32(NFTA_VERDICT_CODE, NF_DROP)]);
    expr(
        "immediate",
        Some(vec![Attr::be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT), Attr::Nested(NFTA_IMMEDIATE_DATA, vec![verdict])]),
    )
}

// ---- messages ----

/// One nfnetlink message body: the `nfgenmsg` and the attributes. `message_type` is the whole netlink type
/// (`NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*`, or a batch marker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfMessage {
    /// The netlink message type.
    pub message_type: u16,
    /// `nfgenmsg.nfgen_family`.
    pub family: u8,
    /// `nfgenmsg.res_id` (sent in network byte order).
    pub res_id: u16,
    /// The attributes (on input: each as [`Attr::Bytes`], the nested flag dropped).
    pub attrs: Vec<Attr>,
}

impl NfMessage {
    /// An nf_tables message of the `bridge` family.
    pub fn nft(msg: u16, attrs: Vec<Attr>) -> NfMessage {
        NfMessage { message_type: (NFNL_SUBSYS_NFTABLES << 8) | msg, family: NFPROTO_BRIDGE, res_id: 0, attrs }
    }

    /// The value of the first attribute of `kind`.
    pub fn attr(&self, kind: u16) -> Option<&[u8]> {
        self.attrs.iter().find_map(|a| match a {
            Attr::Bytes(k, v) if *k == kind => Some(v.as_slice()),
            _ => None,
        })
    }
}

const NFGENMSG_LEN: usize = 4;

impl NetlinkSerializable for NfMessage {
    fn message_type(&self) -> u16 {
        self.message_type
    }
    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN + self.attrs.as_slice().buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = 0; // NFNETLINK_V0
        buffer[2..4].copy_from_slice(&self.res_id.to_be_bytes());
        self.attrs.as_slice().emit(&mut buffer[NFGENMSG_LEN..]);
    }
}

impl NetlinkDeserializable for NfMessage {
    type Error = DecodeError;
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < NFGENMSG_LEN {
            return Err(DecodeError::from(format!("nfnetlink message of {} bytes", payload.len())));
        }
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(&payload[NFGENMSG_LEN..]) {
            let nla = nla?;
            attrs.push(Attr::Bytes(nla.kind(), nla.value().to_vec()));
        }
        Ok(NfMessage {
            message_type: header.message_type,
            family: payload[0],
            res_id: u16::from_be_bytes([payload[2], payload[3]]),
            attrs,
        })
    }
}

fn message(flags: u16, seq: u32, body: NfMessage) -> NetlinkMessage<NfMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(body));
    m.finalize();
    m
}

fn serialize_into(buf: &mut Vec<u8>, m: &NetlinkMessage<NfMessage>) {
    let start = buf.len();
    buf.resize(start + m.buffer_len(), 0);
    m.serialize(&mut buf[start..]);
}

/// A dump request (`NLM_F_REQUEST | NLM_F_DUMP`) of nf_tables message `msg` in the `bridge` family.
pub fn dump_request(msg: u16, seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    serialize_into(&mut buf, &message(NLM_F_REQUEST | NLM_F_DUMP, seq, NfMessage::nft(msg, Vec::new())));
    buf
}

/// An atomic nf_tables batch: `BATCH_BEGIN`, the messages (each acked), `BATCH_END`. Sequence numbers are
/// consecutive from the one given to [`Batch::new`].
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    acked: Vec<u32>,
}

impl Batch {
    /// Starts a batch whose first message (`BATCH_BEGIN`) has sequence number `seq`.
    pub fn new(seq: u32) -> Batch {
        let mut b = Batch { buf: Vec::new(), seq, acked: Vec::new() };
        b.marker(NFNL_MSG_BATCH_BEGIN);
        b
    }

    fn push(&mut self, flags: u16, body: NfMessage) {
        serialize_into(&mut self.buf, &message(flags, self.seq, body));
        if flags & NLM_F_ACK != 0 {
            self.acked.push(self.seq);
        }
        self.seq += 1;
    }

    fn marker(&mut self, ty: u16) {
        self.push(
            NLM_F_REQUEST,
            NfMessage { message_type: ty, family: 0, res_id: NFNL_SUBSYS_NFTABLES, attrs: Vec::new() },
        );
    }

    /// Adds nf_tables message `msg` (`bridge` family) with `NLM_F_REQUEST | NLM_F_ACK | flags`.
    pub fn nft(&mut self, msg: u16, flags: u16, attrs: Vec<Attr>) {
        self.push(NLM_F_REQUEST | NLM_F_ACK | flags, NfMessage::nft(msg, attrs));
    }

    /// Ends the batch: its bytes, and the sequence numbers whose acks to wait for.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u32>) {
        self.marker(NFNL_MSG_BATCH_END);
        (self.buf, self.acked)
    }
}

/// The netlink messages in one received datagram, in order; stops at the first one that does not parse.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<NetlinkMessage<NfMessage>, DecodeError>> + '_ {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = NetlinkBuffer::new_checked(rest).and_then(|b| {
            let len = b.length() as usize;
            NetlinkMessage::<NfMessage>::deserialize(&rest[..len]).map(|m| (m, len))
        });
        match parsed {
            Ok((m, len)) => {
                let aligned = (len + 3) & !3;
                rest = rest.get(aligned..).unwrap_or(&[]);
                Some(Ok(m))
            }
            Err(e) => {
                rest = &[];
                Some(Err(e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn parses_acks_errors_tables_and_done_from_one_datagram() {
        let mut dgram = Vec::new();
        let mut nack = (-libc::EEXIST).to_ne_bytes().to_vec();
        nack.extend_from_slice(&[0u8; 16]); // the request's header, echoed
        dgram.extend(nlmsg(2, 7, &nack));
        dgram.extend(nlmsg(2, 8, &0i32.to_ne_bytes()));
        let mut table = vec![NFPROTO_BRIDGE, 0, 0, 3];
        table.extend_from_slice(&[10, 0, 1, 0, b't', b'-', b'x', b'y', b'z', 0, 0, 0]); // NFTA_TABLE_NAME "t-xyz"
        dgram.extend(nlmsg(NFNL_SUBSYS_NFTABLES << 8, 9, &table));
        dgram.extend(nlmsg(3, 9, &0i32.to_ne_bytes()));

        let msgs: Vec<_> = messages(&dgram).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 4);
        match &msgs[0].payload {
            NetlinkPayload::Error(e) => assert_eq!((msgs[0].header.sequence_number, e.raw_code()), (7, -libc::EEXIST)),
            p => panic!("not an error: {p:?}"),
        }
        match &msgs[1].payload {
            NetlinkPayload::Error(e) => assert_eq!((msgs[1].header.sequence_number, e.raw_code()), (8, 0)),
            p => panic!("not an ack: {p:?}"),
        }
        match &msgs[2].payload {
            NetlinkPayload::InnerMessage(m) => {
                assert_eq!((m.family, m.res_id), (NFPROTO_BRIDGE, 3));
                assert_eq!(m.attr(NFTA_TABLE_NAME), Some(&b"t-xyz\0"[..]));
            }
            p => panic!("not a table: {p:?}"),
        }
        assert!(matches!(msgs[3].payload, NetlinkPayload::Done(_)));
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let mut dgram = nlmsg(2, 1, &0i32.to_ne_bytes());
        dgram.extend(&nlmsg(NFNL_SUBSYS_NFTABLES << 8, 2, &[NFPROTO_BRIDGE, 0, 0, 0, 11, 0, 1, 0])[..22]);
        let got: Vec<_> = messages(&dgram).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert!(got[1].is_err());
    }
}
