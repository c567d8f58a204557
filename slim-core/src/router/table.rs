//! The subscription table: which connections want which names (spec §2.2).
//!
//! Names are keyed by their three component hashes; below each prefix, connections are kept per
//! instance id and per connection kind, plus a per-kind aggregate over all ids of the prefix that
//! anycast/broadcast publishes (id = any instance) select from. Every list keeps a round-robin
//! cursor so `fanout == 1` spreads load across instances and connections.
//!
//! Bookkeeping is per `(connection, name, subscription id)` record (as datapath 0.19.10 does), so
//! repeated subscribes are idempotent and id-0 replays do not overwrite each other; a connection
//! stays in the routing lists while it has at least one record for the name.

use rustc_hash::{FxHashMap, FxHashSet};
use slim_proto::NameKey;

use super::{ConnId, ConnectionKind};

const KINDS: usize = 4;

/// Connections of one kind for one name, with a round-robin cursor.
#[derive(Debug, Default, Clone)]
struct ConnList {
    conns: Vec<ConnId>,
    cursor: usize,
}

impl ConnList {
    fn insert(&mut self, conn: ConnId) {
        if !self.conns.contains(&conn) {
            self.conns.push(conn);
        }
    }

    fn remove(&mut self, conn: ConnId) {
        if let Some(pos) = self.conns.iter().position(|c| *c == conn) {
            self.conns.swap_remove(pos);
        }
    }

    /// The next connection other than `exclude`, round-robin.
    fn pick(&mut self, exclude: ConnId) -> Option<ConnId> {
        let n = self.conns.len();
        for step in 0..n {
            let idx = (self.cursor + step) % n;
            let conn = self.conns[idx];
            if conn != exclude {
                self.cursor = (idx + 1) % n;
                return Some(conn);
            }
        }
        None
    }
}

#[derive(Debug, Default)]
struct Slots {
    by_kind: [ConnList; KINDS],
}

impl Slots {
    fn is_empty(&self) -> bool {
        self.by_kind.iter().all(|l| l.conns.is_empty())
    }
}

#[derive(Debug, Default)]
struct PrefixEntry {
    by_id: FxHashMap<u128, Slots>,
    /// Union over all ids, per kind.
    aggregate: Slots,
    /// How many ids of this prefix each connection is subscribed to (keeps `aggregate` exact).
    aggregate_refs: FxHashMap<ConnId, u32>,
}

/// Which outputs a message may take (spec §2.2 `MatchFilter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchFilter {
    /// Messages that arrived from a peer node are not sent to other peers (one-hop rule).
    pub exclude_peers: bool,
}

/// Did an add/remove change whether the connection is routed for this name?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The connection is newly routed (first record) or no longer routed (last record gone).
    Transition,
    /// Records changed but routing did not (or nothing changed at all).
    Unchanged,
}

#[derive(Debug, Default)]
pub struct SubscriptionTable {
    prefixes: FxHashMap<[u64; 3], PrefixEntry>,
    /// conn → name → subscription ids recorded for it. A set, not a list: a connection may send
    /// any number of ids for one name, and each (un)subscribe must not cost O(ids).
    records: FxHashMap<ConnId, FxHashMap<NameKey, FxHashSet<u64>>>,
    record_count: usize,
}

impl SubscriptionTable {
    /// Records `(conn, name, sub_id)`. Idempotent.
    pub fn add(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        name: NameKey,
        sub_id: u64,
    ) -> Change {
        let ids = self
            .records
            .entry(conn)
            .or_default()
            .entry(name)
            .or_default();
        if !ids.insert(sub_id) {
            return Change::Unchanged;
        }
        self.record_count += 1;
        if ids.len() > 1 {
            return Change::Unchanged;
        }
        let entry = self.prefixes.entry(name.components).or_default();
        entry.by_id.entry(name.id).or_default().by_kind[kind as usize].insert(conn);
        let refs = entry.aggregate_refs.entry(conn).or_insert(0);
        *refs += 1;
        if *refs == 1 {
            entry.aggregate.by_kind[kind as usize].insert(conn);
        }
        Change::Transition
    }

    /// Removes the record `(conn, name, sub_id)`; if there is none, any one record of `(conn, name)`
    /// (clients re-subscribe with id 0 after a reconnect but unsubscribe with the original id).
    /// `None` if the connection has no record for the name at all.
    pub fn remove(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        name: NameKey,
        sub_id: u64,
    ) -> Option<Change> {
        let names = self.records.get_mut(&conn)?;
        let ids = names.get_mut(&name)?;
        let removed = ids.remove(&sub_id)
            || ids
                .iter()
                .next()
                .copied()
                .is_some_and(|any| ids.remove(&any));
        if !removed {
            return None; // not reached: empty sets are removed with their last record
        }
        self.record_count -= 1;
        if !ids.is_empty() {
            return Some(Change::Unchanged);
        }
        names.remove(&name);
        if names.is_empty() {
            self.records.remove(&conn);
        }
        self.unroute(conn, kind, name);
        Some(Change::Transition)
    }

    /// Drops every record of a connection; returns the names it was routed for.
    pub fn remove_connection(&mut self, conn: ConnId, kind: ConnectionKind) -> Vec<NameKey> {
        let Some(names) = self.records.remove(&conn) else {
            return Vec::new();
        };
        let mut removed = Vec::with_capacity(names.len());
        for (name, ids) in names {
            self.record_count -= ids.len();
            self.unroute(conn, kind, name);
            removed.push(name);
        }
        removed.sort_unstable();
        removed
    }

    fn unroute(&mut self, conn: ConnId, kind: ConnectionKind, name: NameKey) {
        let Some(entry) = self.prefixes.get_mut(&name.components) else {
            return;
        };
        if let Some(slots) = entry.by_id.get_mut(&name.id) {
            slots.by_kind[kind as usize].remove(conn);
            if slots.is_empty() {
                entry.by_id.remove(&name.id);
            }
        }
        if let Some(refs) = entry.aggregate_refs.get_mut(&conn) {
            *refs -= 1;
            if *refs == 0 {
                entry.aggregate_refs.remove(&conn);
                entry.aggregate.by_kind[kind as usize].remove(conn);
            }
        }
        if entry.by_id.is_empty() {
            self.prefixes.remove(&name.components);
        }
    }

    fn slots_mut(&mut self, name: &NameKey) -> Option<&mut Slots> {
        let entry = self.prefixes.get_mut(&name.components)?;
        if name.is_any_instance() {
            Some(&mut entry.aggregate)
        } else {
            entry.by_id.get_mut(&name.id)
        }
    }

    /// One connection for `name` other than `incoming`: kinds tried in the order
    /// Local, Remote, Peer, Edge, round-robin within the first kind that has one.
    pub fn match_one(
        &mut self,
        name: &NameKey,
        incoming: ConnId,
        filter: MatchFilter,
    ) -> Option<ConnId> {
        let slots = self.slots_mut(name)?;
        ConnectionKind::MATCH_ORDER
            .iter()
            .filter(|kind| !(filter.exclude_peers && **kind == ConnectionKind::Peer))
            .find_map(|kind| slots.by_kind[*kind as usize].pick(incoming))
    }

    /// Every connection for `name` other than `incoming`, appended to `out`.
    pub fn match_all(
        &mut self,
        name: &NameKey,
        incoming: ConnId,
        filter: MatchFilter,
        out: &mut Vec<ConnId>,
    ) {
        let Some(slots) = self.slots_mut(name) else {
            return;
        };
        for kind in ConnectionKind::MATCH_ORDER {
            if filter.exclude_peers && kind == ConnectionKind::Peer {
                continue;
            }
            out.extend(
                slots.by_kind[kind as usize]
                    .conns
                    .iter()
                    .copied()
                    .filter(|c| *c != incoming),
            );
        }
    }

    /// Number of `(connection, name, subscription id)` records.
    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// Number of distinct `(connection, name)` routes.
    pub fn route_count(&self) -> usize {
        self.records.values().map(|names| names.len()).sum()
    }

    /// The names a connection is routed for (sorted, for deterministic output).
    pub fn names_of(&self, conn: ConnId) -> Vec<NameKey> {
        let mut names: Vec<NameKey> = self
            .records
            .get(&conn)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slim_proto::name::ANY_INSTANCE;

    const NO_FILTER: MatchFilter = MatchFilter {
        exclude_peers: false,
    };

    fn key(svc: u64, id: u128) -> NameKey {
        NameKey {
            components: [1, 2, svc],
            id,
        }
    }

    #[test]
    fn exact_id_matches_only_that_instance() {
        let mut t = SubscriptionTable::default();
        t.add(10, ConnectionKind::Edge, key(3, 7), 1);
        t.add(11, ConnectionKind::Edge, key(3, 8), 2);
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), Some(10));
        assert_eq!(t.match_one(&key(3, 8), 99, NO_FILTER), Some(11));
        assert_eq!(t.match_one(&key(3, 9), 99, NO_FILTER), None);
        assert_eq!(t.match_one(&key(4, 7), 99, NO_FILTER), None);
    }

    #[test]
    fn anycast_round_robins_over_instances_and_skips_incoming() {
        let mut t = SubscriptionTable::default();
        t.add(10, ConnectionKind::Edge, key(3, 7), 1);
        t.add(11, ConnectionKind::Edge, key(3, 8), 2);
        let any = key(3, ANY_INSTANCE);
        let picks: Vec<_> = (0..4)
            .map(|_| t.match_one(&any, 99, NO_FILTER).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|c| **c == 10).count(), 2);
        assert_eq!(picks.iter().filter(|c| **c == 11).count(), 2);
        for _ in 0..3 {
            assert_eq!(t.match_one(&any, 10, NO_FILTER), Some(11));
        }
        let mut all = Vec::new();
        t.match_all(&any, 10, NO_FILTER, &mut all);
        assert_eq!(all, vec![11]);
    }

    #[test]
    fn kinds_are_tried_in_order() {
        let mut t = SubscriptionTable::default();
        t.add(1, ConnectionKind::Edge, key(3, 7), 1);
        t.add(2, ConnectionKind::Peer, key(3, 7), 1);
        t.add(3, ConnectionKind::Remote, key(3, 7), 1);
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), Some(3));
        assert_eq!(t.match_one(&key(3, 7), 3, NO_FILTER), Some(2));
        assert_eq!(
            t.match_one(
                &key(3, 7),
                3,
                MatchFilter {
                    exclude_peers: true
                }
            ),
            Some(1)
        );
    }

    #[test]
    fn records_are_idempotent_and_counted() {
        let mut t = SubscriptionTable::default();
        assert_eq!(
            t.add(1, ConnectionKind::Edge, key(3, 7), 5),
            Change::Transition
        );
        assert_eq!(
            t.add(1, ConnectionKind::Edge, key(3, 7), 5),
            Change::Unchanged
        );
        assert_eq!(
            t.add(1, ConnectionKind::Edge, key(3, 7), 0),
            Change::Unchanged
        );
        assert_eq!(t.record_count(), 2);
        assert_eq!(t.route_count(), 1);
        assert_eq!(
            t.remove(1, ConnectionKind::Edge, key(3, 7), 5),
            Some(Change::Unchanged)
        );
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), Some(1));
        // Unsubscribe with an id we never saw still removes the remaining record.
        assert_eq!(
            t.remove(1, ConnectionKind::Edge, key(3, 7), 42),
            Some(Change::Transition)
        );
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), None);
        assert_eq!(t.remove(1, ConnectionKind::Edge, key(3, 7), 5), None);
        assert_eq!(t.record_count(), 0);
        assert!(t.prefixes.is_empty());
    }

    #[test]
    fn aggregate_tracks_multiple_ids_of_one_connection() {
        let mut t = SubscriptionTable::default();
        t.add(1, ConnectionKind::Edge, key(3, 7), 1);
        t.add(1, ConnectionKind::Edge, key(3, 8), 2);
        t.remove(1, ConnectionKind::Edge, key(3, 7), 1);
        assert_eq!(t.match_one(&key(3, ANY_INSTANCE), 99, NO_FILTER), Some(1));
        t.remove(1, ConnectionKind::Edge, key(3, 8), 2);
        assert_eq!(t.match_one(&key(3, ANY_INSTANCE), 99, NO_FILTER), None);
    }

    #[test]
    fn remove_connection_drops_everything() {
        let mut t = SubscriptionTable::default();
        t.add(1, ConnectionKind::Edge, key(3, 7), 1);
        t.add(1, ConnectionKind::Edge, key(4, ANY_INSTANCE), 2);
        t.add(2, ConnectionKind::Edge, key(3, 7), 3);
        assert_eq!(t.remove_connection(1, ConnectionKind::Edge).len(), 2);
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), Some(2));
        assert_eq!(t.match_one(&key(4, ANY_INSTANCE), 99, NO_FILTER), None);
        assert_eq!(t.record_count(), 1);
    }

    #[test]
    fn any_instance_subscription_is_found_by_anycast_only() {
        let mut t = SubscriptionTable::default();
        t.add(1, ConnectionKind::Edge, key(3, ANY_INSTANCE), 1);
        assert_eq!(t.match_one(&key(3, 7), 99, NO_FILTER), None);
        assert_eq!(t.match_one(&key(3, ANY_INSTANCE), 99, NO_FILTER), Some(1));
    }
}
