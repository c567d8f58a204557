//! Structural checks a node applies to every received message (spec §1.2,
//! `ProtoMessage::validate` in the reference).

use crate::pb;
use crate::pb::message::MessageType;

/// The first rule a message breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    #[error("message has no message_type")]
    MissingMessageType,
    #[error("link message has no link_type")]
    MissingLinkType,
    #[error("{0} has no SLIM header")]
    MissingHeader(&'static str),
    #[error("{0} header has no source name")]
    MissingSource(&'static str),
    #[error("{0} header has no destination name")]
    MissingDestination(&'static str),
    #[error("publish has no session header")]
    MissingSessionHeader,
}

fn check_header(
    kind: &'static str,
    header: Option<&pb::SlimHeader>,
) -> Result<(), ValidationError> {
    let header = header.ok_or(ValidationError::MissingHeader(kind))?;
    if header
        .source
        .as_ref()
        .and_then(|n| n.name.as_ref())
        .is_none()
    {
        return Err(ValidationError::MissingSource(kind));
    }
    if header
        .destination
        .as_ref()
        .and_then(|n| n.name.as_ref())
        .is_none()
    {
        return Err(ValidationError::MissingDestination(kind));
    }
    Ok(())
}

/// Checks the rules of spec §1.2 that a router relies on.
pub fn validate(message: &pb::Message) -> Result<(), ValidationError> {
    match &message.message_type {
        None => Err(ValidationError::MissingMessageType),
        Some(MessageType::Link(link)) => link
            .link_type
            .as_ref()
            .map(|_| ())
            .ok_or(ValidationError::MissingLinkType),
        Some(MessageType::Subscribe(s)) => check_header("subscribe", s.header.as_ref()),
        Some(MessageType::Unsubscribe(u)) => check_header("unsubscribe", u.header.as_ref()),
        Some(MessageType::Publish(p)) => {
            check_header("publish", p.header.as_ref())?;
            p.session
                .as_ref()
                .map(|_| ())
                .ok_or(ValidationError::MissingSessionHeader)
        }
        Some(MessageType::SubscriptionAck(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Name;

    fn header() -> pb::SlimHeader {
        pb::SlimHeader {
            source: Some(Name::new("a", "b", "c").to_pb()),
            destination: Some(Name::new("x", "y", "z").to_pb()),
            ttl: 8,
            fanout: 1,
            ..Default::default()
        }
    }

    fn publish(header: Option<pb::SlimHeader>, session: bool) -> pb::Message {
        pb::Message {
            message_type: Some(MessageType::Publish(pb::Publish {
                header,
                session: session.then(pb::SessionHeader::default),
                msg: None,
            })),
            metadata: Default::default(),
        }
    }

    #[test]
    fn every_rule() {
        assert_eq!(
            validate(&pb::Message::default()),
            Err(ValidationError::MissingMessageType)
        );
        let link = pb::Message {
            message_type: Some(MessageType::Link(pb::Link { link_type: None })),
            metadata: Default::default(),
        };
        assert_eq!(validate(&link), Err(ValidationError::MissingLinkType));
        assert_eq!(
            validate(&publish(None, true)),
            Err(ValidationError::MissingHeader("publish"))
        );
        let mut h = header();
        h.source = None;
        assert_eq!(
            validate(&publish(Some(h), true)),
            Err(ValidationError::MissingSource("publish"))
        );
        let mut h = header();
        h.destination.as_mut().unwrap().name = None;
        assert_eq!(
            validate(&publish(Some(h), true)),
            Err(ValidationError::MissingDestination("publish"))
        );
        assert_eq!(
            validate(&publish(Some(header()), false)),
            Err(ValidationError::MissingSessionHeader)
        );
        assert_eq!(validate(&publish(Some(header()), true)), Ok(()));
        let sub = pb::Message {
            message_type: Some(MessageType::Subscribe(pb::Subscribe {
                header: None,
                subscription_id: 1,
            })),
            metadata: Default::default(),
        };
        assert_eq!(
            validate(&sub),
            Err(ValidationError::MissingHeader("subscribe"))
        );
        let unsub = pb::Message {
            message_type: Some(MessageType::Unsubscribe(pb::Unsubscribe {
                header: Some(header()),
                subscription_id: 1,
            })),
            metadata: Default::default(),
        };
        assert_eq!(validate(&unsub), Ok(()));
    }
}
