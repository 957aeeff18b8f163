//! Orders from the server API to live connections, on every gateway:
//! `disconnect` a user, `unsubscribe` a user from a room, and token
//! revocations (`revoke`).
//!
//! Owns the node's registry of authenticated connections by user
//! ([`Registry`]: each connection registers a [`ConnHandle`] once its token
//! is accepted and its task watches the handle's orders), the revocation list
//! (`revoke`: a JetStream key-value bucket in cluster mode, memory in
//! embedded mode) and the control subject (`subject`): in cluster mode an
//! order is published on `<prefix>.ctl.order`, which every gateway
//! subscribes to, and each gateway applies it to its own connections.
//! Does not own what a connection does with an order (`conn`) nor HTTP
//! (`http::api`).

mod revoke;
mod subject;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::model::{ConnId, RoomId};
pub use revoke::{Revocations, RevokeError};
pub use subject::{Control, GATHER_MAX, GATHER_QUIET, InfoFn, NodeInfo};

/// The start of every idempotency key of a server API publish (then the
/// API key's id and the caller's key): client keys may not start with it, so
/// an API publish and a client publish never share a key.
pub const API_KEY_MARK: char = '\0';

/// What a connection is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Close with this code; `reconnect` is the advice in the reason text.
    Close { code: u16, reconnect: bool },
    /// Close with 4001: the token was revoked.
    Revoked,
    /// Leave the room (with an `unsubscribed` push) if subscribed.
    Unsubscribe(RoomId),
    /// Push who joined and left the room (presence pushes).
    Presence {
        room: RoomId,
        count: u64,
        join: Arc<[String]>,
        leave: Arc<[String]>,
    },
}

/// An order for every gateway, as carried on the control subject (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Broadcast {
    /// Close every connection of `user` with `code`.
    Disconnect { user: String, code: u16, reconnect: bool },
    /// End `user`'s subscriptions of `room`.
    Unsubscribe { user: String, room: String },
}

/// Close codes the server API may ask for: normal closure, policy
/// violation, restart, and the application range.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000 | 1008 | 1012 | 4000..=4999)
}

/// One authenticated connection's mailbox for orders. Orders are few (an
/// operator's action), so a short mutex-held queue and a wake-up suffice.
#[derive(Debug, Default)]
pub struct ConnHandle {
    /// The user (`sub`), shared by every room's presence entry of the
    /// connection (no copy per room).
    user: Arc<str>,
    /// The accepted token's `iat` (0 when it had none), updated by `refresh`.
    iat: AtomicU64,
    orders: Mutex<Vec<Order>>,
    wake: Notify,
}

/// Most orders queued for one connection; more are dropped (a close is
/// always kept: it ends the connection anyway).
const MAX_ORDERS: usize = 64;

impl ConnHandle {
    fn new(user: &str, iat: u64) -> Self {
        Self {
            user: user.into(),
            iat: AtomicU64::new(iat),
            ..Default::default()
        }
    }

    /// The connection's user.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// Queues `order` and wakes the connection.
    pub fn send(&self, order: Order) {
        {
            let mut q = self.orders.lock();
            if q.len() >= MAX_ORDERS && !matches!(order, Order::Close { .. } | Order::Revoked) {
                // A reader that far behind gets its presence from the next
                // push or a `presence` query.
                return;
            }
            q.push(order);
        }
        self.wake.notify_one();
    }

    /// Resolves once orders are queued (see [`ConnHandle::take`]).
    /// Cancel-safe: an order stays queued until taken.
    pub async fn ready(&self) {
        loop {
            if !self.orders.lock().is_empty() {
                return;
            }
            self.wake.notified().await;
        }
    }

    /// Takes the queued orders, oldest first.
    pub fn take(&self) -> Vec<Order> {
        std::mem::take(&mut *self.orders.lock())
    }

    /// Waits for orders and takes them.
    pub async fn next(&self) -> Vec<Order> {
        self.ready().await;
        self.take()
    }

    /// The token's `iat` now.
    pub fn iat(&self) -> u64 {
        self.iat.load(Ordering::Relaxed)
    }

    /// A `refresh` replaced the token.
    pub fn set_iat(&self, iat: u64) {
        self.iat.store(iat, Ordering::Relaxed);
    }
}

/// The node's authenticated connections by user (`sub`).
#[derive(Default)]
pub struct Registry {
    users: DashMap<String, Vec<(ConnId, Arc<ConnHandle>)>, foldhash::fast::RandomState>,
    /// The user of each connection (presence lists read a room's member
    /// ids and look their users up here: one entry per connection, none
    /// per room joined).
    by_conn: DashMap<ConnId, Arc<str>, foldhash::fast::RandomState>,
}

impl Registry {
    /// Registers connection `conn` of `user`, holding a token issued at
    /// `iat`, unless `user` has `cap` connections here already (`cap` 0:
    /// no cap; `--user-max-conns`): then `None`. The count and the
    /// registration are one step, so concurrent connects never pass the cap.
    pub fn register(&self, user: &str, conn: ConnId, iat: u64, cap: usize) -> Option<Arc<ConnHandle>> {
        let mut conns = self.users.entry(user.to_string()).or_default();
        if cap > 0 && conns.len() >= cap {
            return None;
        }
        let handle = Arc::new(ConnHandle::new(user, iat));
        conns.push((conn, handle.clone()));
        drop(conns);
        self.by_conn.insert(conn, handle.user.clone());
        Some(handle)
    }

    /// Removes connection `conn` of `user`.
    pub fn deregister(&self, user: &str, conn: ConnId) {
        self.by_conn.remove(&conn);
        if let dashmap::Entry::Occupied(mut e) = self.users.entry(user.to_string()) {
            e.get_mut().retain(|(c, _)| *c != conn);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    /// The user of connection `conn`, if it is registered.
    pub fn user_of(&self, conn: ConnId) -> Option<Arc<str>> {
        self.by_conn.get(&conn).map(|u| u.clone())
    }

    /// Distinct users with a connection on this node.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Connections of `user` on this node.
    pub fn count(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |v| v.len())
    }

    /// Sends `order` to every connection of `user` (accepted by `keep`);
    /// returns how many got it.
    fn send_to(&self, user: &str, order: &Order, keep: impl Fn(&ConnHandle) -> bool) -> usize {
        let Some(conns) = self.users.get(user) else {
            return 0;
        };
        let mut n = 0;
        for (_, h) in conns.iter().filter(|(_, h)| keep(h)) {
            h.send(order.clone());
            n += 1;
        }
        n
    }

    /// Applies a broadcast order to this node's connections; returns how
    /// many connections it reached.
    pub fn apply(&self, order: &Broadcast) -> usize {
        match order {
            Broadcast::Disconnect { user, code, reconnect } => self.send_to(
                user,
                &Order::Close {
                    code: *code,
                    reconnect: *reconnect,
                },
                |_| true,
            ),
            Broadcast::Unsubscribe { user, room } => match RoomId::parse(room) {
                Some(room) => self.send_to(user, &Order::Unsubscribe(room), |_| true),
                None => 0,
            },
        }
    }

    /// Closes `user`'s connections whose token was issued before `before`.
    pub fn revoke(&self, user: &str, before: u64) -> usize {
        self.send_to(user, &Order::Revoked, |h| h.iat() < before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn orders_reach_only_the_users_connections_and_revocations_only_old_tokens() {
        let r = Registry::default();
        let a1 = r.register("alice", ConnId(1), 100, 0).unwrap();
        let a2 = r.register("alice", ConnId(2), 300, 0).unwrap();
        let b = r.register("bob", ConnId(3), 100, 2).unwrap();
        assert!(r.register("alice", ConnId(4), 100, 2).is_none(), "alice holds 2");
        assert_eq!(r.count("alice"), 2);
        let order = Broadcast::Disconnect {
            user: "alice".into(),
            code: 4003,
            reconnect: false,
        };
        assert_eq!(r.apply(&order), 2);
        assert_eq!(
            a1.next().await,
            vec![Order::Close {
                code: 4003,
                reconnect: false
            }]
        );
        assert_eq!(a2.next().await.len(), 1);
        assert!(b.orders.lock().is_empty());
        assert_eq!(r.revoke("alice", 200), 1);
        assert_eq!(a1.next().await, vec![Order::Revoked]);
        assert!(a2.orders.lock().is_empty());
        r.deregister("alice", ConnId(1));
        r.deregister("alice", ConnId(2));
        assert_eq!(r.count("alice"), 0);
        assert!(r.users.get("alice").is_none());
    }

    #[test]
    fn close_codes_are_the_application_range_and_three_standard_ones() {
        assert!(valid_close_code(4001) && valid_close_code(1012) && valid_close_code(1000));
        assert!(!valid_close_code(1005) && !valid_close_code(3000) && !valid_close_code(5000));
    }
}
