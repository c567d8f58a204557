//! The toy network of the MLS session tests: session layers wired together by a router that
//! matches like a node (exact names, any-instance names, channel subscriptions), with a hook
//! that sees every copy in flight (sender, target, message) and may alter or drop it.

#![allow(dead_code)] // each test file uses its own share

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use slim_core::session::{
    LayerConfig, Output, Reliability, SessionConfig, SessionDrop, SessionEvent, SessionId,
    SessionLayer,
};
use slim_core::Timestamp;
use slim_proto::name::ANY_INSTANCE;
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt};
use slim_proto::{Name, NameKey};

pub const SECRET: &str = "interop-shared-secret-0123456789abcdef-0123456789";
pub const UNIX0: u64 = 1_795_600_000;

/// What the hook does with a message in flight.
pub enum Fate {
    Deliver,
    Drop,
}

/// `(from, to, message)`, for each copy.
pub type Hook = Box<dyn FnMut(usize, usize, &mut pb::Message) -> Fate>;

pub struct Net {
    pub apps: Vec<SessionLayer>,
    pub subs: Vec<Vec<NameKey>>,
    pub events: Vec<Vec<SessionEvent>>,
    /// Every message sent, as it left its sender.
    pub wire: Vec<(usize, pb::Message)>,
    pub now: Timestamp,
    pub hook: Hook,
}

pub fn publish(m: &pb::Message) -> &pb::Publish {
    match &m.message_type {
        Some(pb::message::MessageType::Publish(p)) => p,
        _ => panic!("not a publish"),
    }
}

pub fn publish_mut(m: &mut pb::Message) -> &mut pb::Publish {
    match &mut m.message_type {
        Some(pb::message::MessageType::Publish(p)) => p,
        _ => panic!("not a publish"),
    }
}

pub fn kind(m: &pb::Message) -> Mt {
    Mt::try_from(publish(m).session.as_ref().unwrap().session_message_type).unwrap()
}

pub fn command(m: &pb::Message) -> Option<Cmd> {
    match publish(m).msg.as_ref()?.content_type.as_ref()? {
        pb::content::ContentType::CommandPayload(c) => c.command_payload_type.clone(),
        _ => None,
    }
}

pub fn blob(m: &pb::Message) -> Bytes {
    match publish(m)
        .msg
        .as_ref()
        .and_then(|c| c.content_type.as_ref())
    {
        Some(pb::content::ContentType::AppPayload(app)) => app.blob.clone(),
        _ => panic!("no application payload"),
    }
}

pub fn blob_mut(m: &mut pb::Message) -> &mut Bytes {
    match publish_mut(m)
        .msg
        .as_mut()
        .and_then(|c| c.content_type.as_mut())
    {
        Some(pb::content::ContentType::AppPayload(app)) => &mut app.blob,
        _ => panic!("no application payload"),
    }
}

pub fn encrypted() -> SessionConfig {
    SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_millis(200),
            max_retries: 5,
        }),
        metadata: BTreeMap::new(),
        mls: true,
    }
}

impl Net {
    pub fn new(services: &[&str]) -> Net {
        Self::with_secrets(&services.iter().map(|s| (*s, SECRET)).collect::<Vec<_>>())
    }

    pub fn with_secrets(apps: &[(&str, &str)]) -> Net {
        let apps: Vec<SessionLayer> = apps
            .iter()
            .enumerate()
            .map(|(i, (service, secret))| {
                SessionLayer::new(
                    LayerConfig {
                        name: Name::new("org", "ns", service),
                        secret: (*secret).into(),
                        unix_at_zero: UNIX0,
                    },
                    [i as u8 + 7; 32],
                )
                .unwrap()
            })
            .collect();
        Net {
            subs: apps.iter().map(|a| vec![a.name().key()]).collect(),
            events: vec![Vec::new(); apps.len()],
            apps,
            wire: Vec::new(),
            now: Timestamp::ZERO,
            hook: Box::new(|_, _, _| Fate::Deliver),
        }
    }

    pub fn name(&self, i: usize) -> Name {
        self.apps[i].name().clone()
    }

    pub fn targets(&self, from: usize, m: &pb::Message) -> Vec<usize> {
        let header = publish(m).header.as_ref().unwrap();
        let dest = NameKey::from_pb(header.destination.as_ref().unwrap()).unwrap();
        let matching = (0..self.apps.len()).filter(|j| *j != from).filter(|j| {
            self.subs[*j].iter().any(|k| {
                k.components == dest.components && (dest.id == ANY_INSTANCE || k.id == dest.id)
            })
        });
        if header.fanout == 1 {
            matching.take(1).collect()
        } else {
            matching.collect()
        }
    }

    /// Carries out every output until all apps are quiet.
    pub fn run(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.apps.len() {
                while let Some(output) = self.apps[i].poll_output() {
                    moved = true;
                    match output {
                        Output::Send(m) => {
                            let m = *m;
                            self.wire.push((i, m.clone()));
                            for j in self.targets(i, &m) {
                                let mut copy = m.clone();
                                if let Fate::Drop = (self.hook)(i, j, &mut copy) {
                                    continue;
                                }
                                self.apps[j].handle_message(copy, self.now);
                            }
                        }
                        Output::Subscribe(name) => self.subs[i].push(name.key()),
                        Output::Unsubscribe(name) => self.subs[i].retain(|k| *k != name.key()),
                        Output::Event(e) => self.events[i].push(e),
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs the apps' timers for `span` of simulated time.
    pub fn advance(&mut self, span: Duration) {
        let end = self.now + span;
        loop {
            self.run();
            let next = self
                .apps
                .iter()
                .filter_map(SessionLayer::poll_timeout)
                .min();
            match next {
                Some(at) if at <= end => {
                    self.now = self.now.max(at);
                    for app in &mut self.apps {
                        app.handle_timeout(self.now);
                    }
                }
                _ => break,
            }
        }
        self.now = end;
        self.run();
    }

    pub fn messages(&self, i: usize, session: SessionId) -> Vec<Bytes> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Message {
                    session: s,
                    payload,
                    ..
                } if *s == session => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn incoming(&self, i: usize) -> Option<(SessionId, bool)> {
        self.events[i].iter().find_map(|e| match e {
            SessionEvent::Incoming { session, mls, .. } => Some((*session, *mls)),
            _ => None,
        })
    }

    pub fn sent(&self, from: usize, what: Mt) -> Vec<&pb::Message> {
        self.wire
            .iter()
            .filter(|(i, m)| *i == from && kind(m) == what)
            .map(|(_, m)| m)
            .collect()
    }

    pub fn dropped(&self, i: usize, reason: SessionDrop) -> u64 {
        self.apps[i].stats().dropped(reason)
    }
}

pub fn message_id(m: &pb::Message) -> u32 {
    publish(m).session.as_ref().unwrap().message_id
}

/// A moderator (app 0) and apps `services[1..]`, of which the first `invited` are invited into
/// one MLS group (each must join with MLS on).
pub fn group(services: &[&str], invited: usize) -> (Net, SessionId) {
    group_with(services, invited, encrypted())
}

/// [`group`] with the moderator's session settings (`mls` must be on).
pub fn group_with(services: &[&str], invited: usize, config: SessionConfig) -> (Net, SessionId) {
    let mut net = Net::new(services);
    let session = net.apps[0].create_group(&Name::new("org", "ns", "chan"), config, net.now);
    net.run();
    for member in &services[1..=invited] {
        net.apps[0]
            .invite(session, &Name::new("org", "ns", member), net.now)
            .unwrap();
        net.advance(Duration::from_millis(50));
    }
    assert_eq!(net.apps[0].members(session).unwrap().len(), invited + 1);
    for i in 1..=invited {
        assert_eq!(net.incoming(i), Some((session, true)), "member {i} joined");
    }
    (net, session)
}
