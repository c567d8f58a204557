//! SLIM names: `org/namespace/service` plus a 128-bit instance id (spec §1.4).
//!
//! On the wire each string component travels twice: as text (`StringName`) and as a 64-bit hash
//! (`EncodedName`). The hash is XXH64 (seed 0) over the UTF-8 bytes followed by one `0xFF` byte,
//! which is what Rust's `Hash for str` feeds a hasher — the reference hashes that way, so we must too.

use std::fmt;
use std::sync::Arc;

use crate::pb;

/// Instance id meaning "any instance" (anycast / broadcast).
pub const ANY_INSTANCE: u128 = u128::MAX;
/// Ids at or above this value are reserved (`NameId::RESERVED_IDS = 50` in the reference).
pub const FIRST_RESERVED_ID: u128 = u128::MAX - 50;

/// Hash of one name component, exactly as the reference computes it.
pub fn component_hash(component: &str) -> u64 {
    let mut hasher = xxhash_rust::xxh64::Xxh64::new(0);
    hasher.update(component.as_bytes());
    hasher.update(&[0xff]);
    hasher.digest()
}

/// The application instance id the reference derives from an identity id (spec §1.4):
/// XXH3-128 (seed 0) of the id, folded out of the reserved range.
pub fn app_instance_id(identity_id: &str) -> u128 {
    let id = xxhash_rust::xxh3::xxh3_128(identity_id.as_bytes());
    if id >= FIRST_RESERVED_ID {
        id % FIRST_RESERVED_ID
    } else {
        id
    }
}

/// The data and control channel ids of a group session (spec §1.4): XXH3-128 with seed `salt`
/// over `"<moderator token id>/<org>/<ns>/<svc>/data"` (and `…/control`), folded out of the
/// reserved range; the salt grows until the two differ.
pub fn channel_ids(moderator_id: &str, channel: &Name) -> (u128, u128) {
    let [org, namespace, service] = channel.components();
    let derive = |suffix: &str, salt: u64| {
        let text = format!("{moderator_id}/{org}/{namespace}/{service}/{suffix}");
        let id = xxhash_rust::xxh3::xxh3_128_with_seed(text.as_bytes(), salt);
        if is_reserved_id(id) {
            (id % (FIRST_RESERVED_ID - 1)) + 1
        } else {
            id
        }
    };
    let mut salt = 0;
    loop {
        let (data, control) = (derive("data", salt), derive("control", salt));
        if data != control || salt >= 10 {
            return (data, control);
        }
        salt += 1;
    }
}

/// True for ids in the reserved range (including [`ANY_INSTANCE`]).
pub fn is_reserved_id(id: u128) -> bool {
    id >= FIRST_RESERVED_ID
}

/// The routing key of a name: three component hashes and the instance id.
///
/// This is what the subscription table and the router work with; the strings are not needed to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub components: [u64; 3],
    pub id: u128,
}

impl NameKey {
    /// The key of a wire `EncodedName`; an absent `name_id` means "any instance", as in the reference.
    pub fn from_encoded(encoded: &pb::EncodedName) -> Self {
        Self::from_encoded_ref(&crate::view::EncodedRef::from(encoded))
    }

    /// As [`NameKey::from_encoded`], from a borrowed view.
    pub fn from_encoded_ref(encoded: &crate::view::EncodedRef) -> Self {
        let id = encoded.name_id.map_or(ANY_INSTANCE, |(id_0, id_1)| {
            (u128::from(id_0) << 64) | u128::from(id_1)
        });
        Self {
            components: encoded.components,
            id,
        }
    }

    /// The key of a wire `Name`, if it carries an encoded part.
    pub fn from_pb(name: &pb::Name) -> Option<Self> {
        name.name.as_ref().map(Self::from_encoded)
    }

    pub fn is_any_instance(&self) -> bool {
        self.id == ANY_INSTANCE
    }

    pub fn to_encoded(&self) -> pb::EncodedName {
        pb::EncodedName {
            component_0: self.components[0],
            component_1: self.components[1],
            component_2: self.components[2],
            name_id: Some(name_id(self.id)),
        }
    }
}

fn name_id(id: u128) -> pb::NameId {
    pb::NameId {
        id_0: (id >> 64) as u64,
        id_1: id as u64,
    }
}

/// A full SLIM name: three string components and an instance id.
///
/// The components are shared: a session copies its peer's name into every message it
/// builds, and a copy is then a reference count, not three allocations.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name {
    components: Arc<[String; 3]>,
    key: NameKey,
}

/// Why a string is not a SLIM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameParseError {
    #[error("a SLIM name has the form org/namespace/service[/instance], got {0:?}")]
    WrongComponentCount(String),
    #[error("name component {index} of {name:?} is empty")]
    EmptyComponent { name: String, index: usize },
    #[error("instance id {0:?} is not a UUID, a decimal u128 or NULL_COMPONENT")]
    BadInstance(String),
}

impl Name {
    /// A name for any instance of `org/namespace/service`.
    pub fn new(org: &str, namespace: &str, service: &str) -> Self {
        Self::with_id(org, namespace, service, ANY_INSTANCE)
    }

    pub fn with_id(org: &str, namespace: &str, service: &str, id: u128) -> Self {
        let components = Arc::new([org.to_owned(), namespace.to_owned(), service.to_owned()]);
        let key = NameKey {
            components: [
                component_hash(org),
                component_hash(namespace),
                component_hash(service),
            ],
            id,
        };
        Self { components, key }
    }

    /// Parses `org/ns/svc` (any instance) or `org/ns/svc/<uuid | decimal | NULL_COMPONENT>`.
    pub fn parse(text: &str) -> Result<Self, NameParseError> {
        let parts: Vec<&str> = text.split('/').collect();
        if parts.len() != 3 && parts.len() != 4 {
            return Err(NameParseError::WrongComponentCount(text.to_owned()));
        }
        if let Some(index) = parts[..3].iter().position(|p| p.is_empty()) {
            return Err(NameParseError::EmptyComponent {
                name: text.to_owned(),
                index,
            });
        }
        let id = match parts.get(3) {
            None => ANY_INSTANCE,
            Some(instance) => parse_instance(instance)
                .ok_or_else(|| NameParseError::BadInstance((*instance).to_owned()))?,
        };
        Ok(Self::with_id(parts[0], parts[1], parts[2], id))
    }

    pub fn components(&self) -> [&str; 3] {
        [
            &self.components[0],
            &self.components[1],
            &self.components[2],
        ]
    }

    pub fn id(&self) -> u128 {
        self.key.id
    }

    pub fn key(&self) -> NameKey {
        self.key
    }

    /// The same service with another instance id.
    pub fn with_instance(&self, id: u128) -> Self {
        Self {
            components: self.components.clone(),
            key: NameKey { id, ..self.key },
        }
    }

    /// The wire form, with both the encoded and the string parts, as real clients send it.
    pub fn to_pb(&self) -> pb::Name {
        pb::Name {
            name: Some(self.key.to_encoded()),
            str_name: Some(pb::StringName {
                str_component_0: self.components[0].clone(),
                str_component_1: self.components[1].clone(),
                str_component_2: self.components[2].clone(),
            }),
        }
    }

    /// Builds a name from its wire form. The hashes are taken from the wire (they route), the
    /// strings from `str_name` when present (empty otherwise).
    pub fn from_pb(name: &pb::Name) -> Option<Self> {
        let key = NameKey::from_pb(name)?;
        let components = Arc::new(name.str_name.as_ref().map_or_else(Default::default, |s| {
            [
                s.str_component_0.clone(),
                s.str_component_1.clone(),
                s.str_component_2.clone(),
            ]
        }));
        Some(Self { components, key })
    }
}

fn parse_instance(text: &str) -> Option<u128> {
    if text == "NULL_COMPONENT" {
        return Some(ANY_INSTANCE);
    }
    if text.len() == 36 && text.matches('-').count() == 4 {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        return u128::from_str_radix(&hex, 16).ok();
    }
    text.parse::<u128>().ok()
}

/// Formats an instance id as the reference does: a hyphenated UUID, or `NULL_COMPONENT`.
pub struct InstanceDisplay(pub u128);

impl fmt::Display for InstanceDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == ANY_INSTANCE {
            return f.write_str("NULL_COMPONENT");
        }
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.components();
        write!(f, "{a}/{b}/{c}/{}", InstanceDisplay(self.key.id))
    }
}

impl fmt::Display for NameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.components;
        write!(f, "{a:016x}/{b:016x}/{c:016x}/{}", InstanceDisplay(self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_hash_matches_spec_vectors() {
        let vectors = [
            ("org", 0x873e580376ea963b_u64),
            ("default", 0x219303c7c93f9668),
            ("app", 0x86cb542776a5f6d5),
            ("agntcy", 0x169ca82eb17d6bc2),
            ("ns", 0xeef9769a4c6990d1),
            ("alice", 0x7b90bc8fa5b6b182),
            ("bob", 0x49ae1b437ae573c4),
            ("", 0x95634172a60b7544),
        ];
        for (text, expected) in vectors {
            assert_eq!(component_hash(text), expected, "component {text:?}");
        }
        // Plain XXH64 without the 0xFF terminator must not be what we compute.
        assert_ne!(component_hash("org"), 0xc38126cd35e92b15);
    }

    #[test]
    fn app_instance_id_matches_spec_vectors() {
        assert_eq!(
            app_instance_id("did:key:z6Mkfvtar6ATQYC5jXqVLBjCH8R6AUAuKjta6LsFcG4gUND1"),
            0x48b1da600caab75fa73e4fe334bf1482
        );
        assert_eq!(app_instance_id("alice"), 0x48bb949a3dd26afac9a1342ad0e35dd2);
    }

    /// captures/c_group_mls: the moderator `interop/grp/mod-474d5b37_XzACSocx` created the
    /// channel `interop/grp/chan-474d5b37`; its MSGs went to the data id, updates to the control id.
    #[test]
    fn channel_ids_match_the_capture() {
        let channel = Name::new("interop", "grp", "chan-474d5b37");
        let (data, control) = channel_ids("interop/grp/mod-474d5b37_XzACSocx", &channel);
        assert_eq!(data, 0x400247fbbce906f57f0236f6c5d70030);
        assert_eq!(control, 0xdbd807a77336fa0433cf86ac533416b3);
    }

    #[test]
    fn parse_and_display_round_trip() {
        let name = Name::parse("org/ns/svc/00000000-0000-0000-0000-00000000002a").unwrap();
        assert_eq!(name.id(), 42);
        assert_eq!(
            name.to_string(),
            "org/ns/svc/00000000-0000-0000-0000-00000000002a"
        );
        let any = Name::parse("org/ns/svc").unwrap();
        assert!(any.key().is_any_instance());
        assert_eq!(any.to_string(), "org/ns/svc/NULL_COMPONENT");
        assert_eq!(Name::parse("org/ns/svc/NULL_COMPONENT").unwrap(), any);
        assert_eq!(Name::parse("org/ns/svc/7").unwrap().id(), 7);
    }

    #[test]
    fn parse_rejects_bad_names() {
        assert!(matches!(
            Name::parse("org/ns"),
            Err(NameParseError::WrongComponentCount(_))
        ));
        assert!(matches!(
            Name::parse("org//svc"),
            Err(NameParseError::EmptyComponent { index: 1, .. })
        ));
        assert!(matches!(
            Name::parse("org/ns/svc/zz"),
            Err(NameParseError::BadInstance(_))
        ));
        assert!(Name::parse("a/b/c/d/e").is_err());
    }

    #[test]
    fn absent_name_id_means_any_instance() {
        let encoded = pb::EncodedName {
            component_0: 1,
            component_1: 2,
            component_2: 3,
            name_id: None,
        };
        assert!(NameKey::from_encoded(&encoded).is_any_instance());
    }

    #[test]
    fn pb_round_trip_keeps_key_and_strings() {
        let name = Name::with_id(
            "org",
            "ns",
            "svc",
            0x1234_5678_9abc_def0_1122_3344_5566_7788,
        );
        let wire = name.to_pb();
        assert_eq!(
            wire.name.as_ref().unwrap().name_id.as_ref().unwrap().id_0,
            0x1234_5678_9abc_def0
        );
        assert_eq!(Name::from_pb(&wire).unwrap(), name);
    }

    #[test]
    fn reserved_ids() {
        assert!(is_reserved_id(ANY_INSTANCE));
        assert!(is_reserved_id(u128::MAX - 50));
        assert!(!is_reserved_id(u128::MAX - 51));
    }
}
