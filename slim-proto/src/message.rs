//! Building and reading the application publishes that clients, the session layer and the
//! tools exchange, so each does not unpack the nested `oneof`s its own way.

use bytes::Bytes;

use crate::pb::content::ContentType;
use crate::pb::message::MessageType;
use crate::{pb, Name};

/// An application payload delivered to a client, and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub source: Name,
    pub payload: Bytes,
}

impl pb::SlimHeader {
    /// The header of a message an application sends from `source` to `destination` (any
    /// instance of it when it names none), with the default TTL; `forward_to`: the connection
    /// of the sender's router it must leave by.
    pub fn from_app(
        source: &Name,
        destination: &Name,
        fanout: u32,
        forward_to: Option<u64>,
        version: &str,
    ) -> Self {
        pb::SlimHeader {
            source: Some(source.to_pb()),
            destination: Some(destination.to_pb()),
            fanout,
            version: version.to_owned(),
            ttl: crate::DEFAULT_TTL,
            forward_to,
            ..Default::default()
        }
    }
}

impl pb::Content {
    /// Content carrying an application payload of type `payload_type` (`"msg"` for data).
    pub fn app(payload_type: &str, blob: Bytes) -> Self {
        pb::Content {
            content_type: Some(ContentType::AppPayload(pb::ApplicationPayload {
                payload_type: payload_type.to_owned(),
                blob,
            })),
        }
    }
}

impl pb::Message {
    /// A publish of `blob` as application data (`payload_type` `"msg"`).
    pub fn app_publish(header: pb::SlimHeader, session: pb::SessionHeader, blob: Bytes) -> Self {
        pb::Message {
            message_type: Some(MessageType::Publish(pb::Publish {
                header: Some(header),
                session: Some(session),
                msg: Some(pb::Content::app("msg", blob)),
            })),
            metadata: Default::default(),
        }
    }

    /// A subscription (`subscribe`) or its removal for the destination of `header`, acked by
    /// the node under `subscription_id` (0: no ack wanted).
    pub fn subscription(subscribe: bool, header: pb::SlimHeader, subscription_id: u64) -> Self {
        let header = Some(header);
        let message_type = if subscribe {
            MessageType::Subscribe(pb::Subscribe {
                header,
                subscription_id,
            })
        } else {
            MessageType::Unsubscribe(pb::Unsubscribe {
                header,
                subscription_id,
            })
        };
        pb::Message {
            message_type: Some(message_type),
            metadata: Default::default(),
        }
    }

    /// The publish this message is, if it is one.
    pub fn publish(&self) -> Option<&pb::Publish> {
        match &self.message_type {
            Some(MessageType::Publish(publish)) => Some(publish),
            _ => None,
        }
    }

    /// The application payload of a publish (not of a command).
    pub fn app_payload(&self) -> Option<&pb::ApplicationPayload> {
        match self.publish()?.msg.as_ref()?.content_type.as_ref()? {
            ContentType::AppPayload(app) => Some(app),
            ContentType::CommandPayload(_) => None,
        }
    }

    /// Who sent this publish, when its source name is valid.
    pub fn publish_source(&self) -> Option<Name> {
        Name::from_pb(self.publish()?.header.as_ref()?.source.as_ref()?)
    }

    /// The sender and the application payload of a publish, taken out of it (the sender's
    /// name is only built for a publish that has one).
    pub fn into_app_payload(self) -> Option<Received> {
        let Some(MessageType::Publish(publish)) = self.message_type else {
            return None;
        };
        let Some(ContentType::AppPayload(app)) = publish.msg?.content_type else {
            return None;
        };
        Some(Received {
            source: Name::from_pb(publish.header?.source.as_ref()?)?,
            payload: app.blob,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_and_its_removal_carry_header_and_id() {
        let me = Name::with_id("org", "ns", "alice", 7);
        let header = pb::SlimHeader::from_app(&me, &me, 1, None, "1.0");
        let subscribe = pb::Message::subscription(true, header.clone(), 5);
        assert_eq!(
            subscribe.message_type,
            Some(MessageType::Subscribe(pb::Subscribe {
                header: Some(header.clone()),
                subscription_id: 5
            }))
        );
        let unsubscribe = pb::Message::subscription(false, header.clone(), 5);
        assert_eq!(
            unsubscribe.message_type,
            Some(MessageType::Unsubscribe(pb::Unsubscribe {
                header: Some(header),
                subscription_id: 5
            }))
        );
        assert!(subscribe.metadata.is_empty());
    }

    #[test]
    fn an_app_publish_reads_back() {
        let source = Name::with_id("org", "ns", "alice", 7);
        let header =
            pb::SlimHeader::from_app(&source, &Name::new("org", "ns", "bob"), 1, None, "1.0");
        assert_eq!((header.ttl, header.fanout), (crate::DEFAULT_TTL, 1));
        let message = pb::Message::app_publish(
            header,
            pb::SessionHeader::default(),
            Bytes::from_static(b"hi"),
        );
        assert_eq!(
            message.app_payload().map(|a| a.payload_type.as_str()),
            Some("msg")
        );
        assert_eq!(message.publish_source(), Some(source.clone()));
        assert_eq!(
            message.into_app_payload(),
            Some(Received {
                source,
                payload: Bytes::from_static(b"hi")
            })
        );
    }

    #[test]
    fn commands_and_other_messages_have_no_app_payload() {
        let mut message = pb::Message::app_publish(
            pb::SlimHeader::default(),
            pb::SessionHeader::default(),
            Bytes::new(),
        );
        assert_eq!(message.publish_source(), None, "no source name");
        if let Some(MessageType::Publish(publish)) = &mut message.message_type {
            publish.msg = Some(pb::Content {
                content_type: Some(ContentType::CommandPayload(pb::CommandPayload::default())),
            });
        }
        assert!(message.publish().is_some());
        assert!(message.app_payload().is_none());
        let subscribe = pb::Message {
            message_type: Some(MessageType::Subscribe(pb::Subscribe::default())),
            metadata: Default::default(),
        };
        assert!(subscribe.publish().is_none() && subscribe.app_payload().is_none());
    }
}
