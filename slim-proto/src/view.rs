//! Borrowed views of the routing fields of a `SLIMHeader`: what the header MAC covers and what
//! a node routes on, read either from a decoded header or straight from received bytes
//! ([`crate::forward::PublishView`]) without decoding the message.

use crate::pb;

/// The fields of a `SLIMHeader` that the header MAC's pre-image covers (spec §1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeaderRef<'a> {
    pub source: Option<NameRef<'a>>,
    pub destination: Option<NameRef<'a>>,
    pub identity: &'a str,
    pub fanout: u32,
    pub recv_from: Option<u64>,
    pub forward_to: Option<u64>,
    pub error: Option<bool>,
    pub ttl: u32,
}

/// A wire `Name`: its encoded part and its string components, each as present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NameRef<'a> {
    pub encoded: Option<EncodedRef>,
    pub strings: Option<[&'a str; 3]>,
}

/// A wire `EncodedName`: component hashes and the optional `(id_0, id_1)` instance id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodedRef {
    pub components: [u64; 3],
    pub name_id: Option<(u64, u64)>,
}

impl<'a> From<&'a pb::SlimHeader> for HeaderRef<'a> {
    fn from(header: &'a pb::SlimHeader) -> Self {
        Self {
            source: header.source.as_ref().map(NameRef::from),
            destination: header.destination.as_ref().map(NameRef::from),
            identity: &header.identity,
            fanout: header.fanout,
            recv_from: header.recv_from,
            forward_to: header.forward_to,
            error: header.error,
            ttl: header.ttl,
        }
    }
}

impl HeaderRef<'_> {
    /// An owned header with the fields this view reads (the others left at their defaults):
    /// viewed again, it gives this view.
    pub fn to_pb(&self) -> pb::SlimHeader {
        pb::SlimHeader {
            source: self.source.as_ref().map(NameRef::to_pb),
            destination: self.destination.as_ref().map(NameRef::to_pb),
            identity: self.identity.to_owned(),
            fanout: self.fanout,
            recv_from: self.recv_from,
            forward_to: self.forward_to,
            error: self.error,
            ttl: self.ttl,
            ..Default::default()
        }
    }
}

impl<'a> From<&'a pb::Name> for NameRef<'a> {
    fn from(name: &'a pb::Name) -> Self {
        Self {
            encoded: name.name.as_ref().map(EncodedRef::from),
            strings: name.str_name.as_ref().map(|s| {
                [
                    s.str_component_0.as_str(),
                    s.str_component_1.as_str(),
                    s.str_component_2.as_str(),
                ]
            }),
        }
    }
}

impl NameRef<'_> {
    /// The owned wire name this view reads.
    pub fn to_pb(&self) -> pb::Name {
        pb::Name {
            name: self.encoded.map(|e| pb::EncodedName {
                component_0: e.components[0],
                component_1: e.components[1],
                component_2: e.components[2],
                name_id: e.name_id.map(|(id_0, id_1)| pb::NameId { id_0, id_1 }),
            }),
            str_name: self.strings.map(|[a, b, c]| pb::StringName {
                str_component_0: a.to_owned(),
                str_component_1: b.to_owned(),
                str_component_2: c.to_owned(),
            }),
        }
    }
}

impl From<&pb::EncodedName> for EncodedRef {
    fn from(encoded: &pb::EncodedName) -> Self {
        Self {
            components: [
                encoded.component_0,
                encoded.component_1,
                encoded.component_2,
            ],
            name_id: encoded.name_id.as_ref().map(|id| (id.id_0, id.id_1)),
        }
    }
}
