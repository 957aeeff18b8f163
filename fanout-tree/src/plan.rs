//! The tiered fan-out planner: pure, deterministic sizing of every tier a
//! room's message crosses.
//!
//! Owns the arithmetic shared by the running node and the simulator: when a
//! node splits a room into member shards ([`Limits::sharded`]), how big a
//! shard may get ([`Limits::shard_capacity`]), which shard each member is in
//! ([`Plan::gateways`]), and how many copies of one message each NATS
//! server, leaf link, gateway and core sends ([`Plan::load`]). Does not own
//! sockets, tasks or timing: [`crate::tree`] runs the node tier, NATS runs
//! the regional tiers, and [`Costs`] turns copies into latency.
//!
//! The tiers of one message (see `docs/fanout-tree.md`):
//! 1. **Hub**: the NATS cluster that runs JetStream. The server a message
//!    enters sends one copy per other server with interest (routes) and one
//!    per local connection with interest (gateways in the flat layout, leaf
//!    links in the tiered one).
//! 2. **Region** (tiered layout only): a NATS leaf node per region; its leaf
//!    link to the hub carries one copy per message whatever is behind it,
//!    and the leaf node sends one copy per interested gateway of its region.
//! 3. **Node**: a gateway encodes the message once per codec and offers it to
//!    its local members; above [`Limits::tree_threshold`] members the room is
//!    split into shards of at most [`Limits::shard_capacity`] members that
//!    run on all cores in parallel.
//!
//! Determinism: the same input gives the same plan (no hashing with random
//! seeds, no clocks). [`Plan::update`] keeps every remaining member in its
//! shard, so one change moves nothing else (bounded change).

use std::collections::{BTreeMap, BTreeSet};

/// The knobs of the node tier (the `--tree-threshold` / `--tree-degree`
/// flags) and the shape of the machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Members of a room on one node above which the node splits the room
    /// into shards (`--tree-threshold`); at or below it the room fans out
    /// inline. At least 1.
    pub tree_threshold: usize,
    /// The node tier's fan-out when a room is split (`--tree-degree`): a room
    /// of exactly `tree_threshold + 1` members gets about this many shards, and
    /// no shard ever holds more than `ceil(tree_threshold / tree_degree)`
    /// members, so bigger rooms get more shards, never bigger ones. At least 2.
    pub tree_degree: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tree_threshold: 10_000,
            tree_degree: 16,
        }
    }
}

impl Limits {
    /// Most members in one shard: `ceil(tree_threshold / tree_degree)`, at least 1.
    pub fn shard_capacity(&self) -> usize {
        self.tree_threshold.div_ceil(self.tree_degree.max(1)).max(1)
    }

    /// Whether a room with `members` local members is split into shards.
    pub fn sharded(&self, members: usize) -> bool {
        members > self.tree_threshold
    }

    /// Whether a split room that shrank to `members` goes back to the inline
    /// path: below half the threshold (hysteresis, so a room at the threshold
    /// does not flip at every join and leave).
    pub fn unsharded(&self, members: usize) -> bool {
        members < self.tree_threshold / 2
    }

    /// Shards a fresh plan gives `members` (0 = inline).
    pub fn shards_for(&self, members: usize) -> usize {
        if self.sharded(members) {
            members.div_ceil(self.shard_capacity())
        } else {
            0
        }
    }

    /// The sizes of the shards a split of `members` members makes, in order:
    /// as few shards as the capacity allows (at least one), as even as can
    /// be (the first ones one member bigger). The node's split
    /// ([`crate::tree`]) and the planner cut the same way.
    pub fn shard_lens(&self, members: usize) -> impl Iterator<Item = usize> + use<> {
        let n = members.div_ceil(self.shard_capacity()).max(1);
        let (base, extra) = (members / n, members % n);
        (0..n).map(move |i| base + usize::from(i < extra))
    }
}

/// One gateway and the ids of the room's members connected to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayMembers {
    /// Unique across the layout.
    pub gateway: u32,
    /// Member ids (unique across the layout).
    pub members: Vec<u64>,
}

/// Where a room's members are: regions, each with its gateways.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// `regions[r]` lists the gateways of region `r`.
    pub regions: Vec<Vec<GatewayMembers>>,
}

/// How NATS is laid out around the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// NATS servers in the hub cluster (at least 1).
    pub hub_servers: usize,
    /// Tiered: one leaf node per region, gateways connect to their region's
    /// leaf node. Flat: every gateway connects to a hub server.
    pub leaf_nodes: bool,
    /// Cores per gateway that run shards.
    pub cores: usize,
}

/// The node tier of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPlan {
    pub gateway: u32,
    pub region: usize,
    /// Inline: one group with every member, run on one core. Sharded: the
    /// shards, each at most [`Limits::shard_capacity`] members (a shard left
    /// empty by leaves keeps its index until it is filled again).
    pub shards: Vec<Vec<u64>>,
    pub sharded: bool,
}

impl GatewayPlan {
    /// Members on this gateway.
    pub fn members(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }

    /// Deliveries of the busiest core for one message: shards go to the
    /// least loaded core, biggest first (how a work-stealing runtime ends up).
    pub fn busiest_core(&self, cores: usize) -> usize {
        if !self.sharded {
            return self.members();
        }
        let mut sizes: Vec<usize> = self.shards.iter().map(Vec::len).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut load = vec![0usize; cores.max(1)];
        for s in sizes {
            let min = load.iter_mut().min().expect("at least one core");
            *min += s;
        }
        load.into_iter().max().unwrap_or(0)
    }
}

/// A room's plan: the node tier of every gateway with members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub limits: Limits,
    /// Sorted by gateway id.
    pub gateways: Vec<GatewayPlan>,
}

/// Copies of one message sent at each tier, worst case over where it was
/// published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Copies sent by the busiest hub server.
    pub hub_server: usize,
    /// Copies sent by the busiest leaf node (0 in the flat layout).
    pub leaf_node: usize,
    /// Copies over the busiest leaf link, per direction (0 in the flat layout).
    pub leaf_link: usize,
    /// Deliveries by the busiest gateway.
    pub gateway: usize,
    /// Deliveries by the busiest core of any gateway.
    pub core: usize,
    /// Shards of the gateway with the busiest core (0 = inline).
    pub core_shards: usize,
    /// Copies every server sends in total (hub and leaf nodes).
    pub nats_total: usize,
    /// Copies that leave the hub's region (region 0) per message: one per
    /// remote gateway flat, one per remote leaf link tiered.
    pub wan: usize,
}

fn fresh(g: &GatewayMembers, region: usize, limits: &Limits) -> GatewayPlan {
    let mut members = g.members.clone();
    members.sort_unstable();
    let sharded = limits.sharded(members.len());
    let shards = if sharded {
        let mut rest = &members[..];
        limits
            .shard_lens(members.len())
            .map(|len| {
                let (shard, tail) = rest.split_at(len);
                rest = tail;
                shard.to_vec()
            })
            .collect()
    } else {
        vec![members]
    };
    GatewayPlan {
        gateway: g.gateway,
        region,
        shards,
        sharded,
    }
}

/// Applies a gateway's new member list to its previous plan: members that
/// stay keep their shard, leavers leave holes, joiners (in id order) fill
/// the lowest shards with room, then new shards. Crossing the threshold
/// re-plans the gateway from scratch (the node does the same: it moves
/// every member once, in order, when it splits or merges a room).
fn updated(prev: &GatewayPlan, g: &GatewayMembers, region: usize, limits: &Limits) -> GatewayPlan {
    let n = g.members.len();
    let stay_sharded = prev.sharded && !limits.unsharded(n);
    if !stay_sharded {
        return fresh(g, region, limits);
    }
    let now: BTreeSet<u64> = g.members.iter().copied().collect();
    let mut shards: Vec<Vec<u64>> = prev
        .shards
        .iter()
        .map(|s| s.iter().copied().filter(|m| now.contains(m)).collect())
        .collect();
    let had: BTreeSet<u64> = prev.shards.iter().flatten().copied().collect();
    let cap = limits.shard_capacity();
    let mut open = 0;
    for m in now.difference(&had) {
        while open < shards.len() && shards[open].len() >= cap {
            open += 1;
        }
        if open == shards.len() {
            shards.push(Vec::new());
        }
        shards[open].push(*m);
    }
    // Trailing empty shards go (their index was the last).
    while shards.len() > 1 && shards.last().is_some_and(Vec::is_empty) {
        shards.pop();
    }
    GatewayPlan {
        gateway: g.gateway,
        region,
        shards,
        sharded: true,
    }
}

impl Plan {
    /// The plan for `layout` from scratch: each gateway's members sorted by
    /// id and cut into equal shards.
    pub fn new(layout: &Layout, limits: Limits) -> Plan {
        // An update of an empty plan plans every gateway afresh.
        Plan {
            limits,
            gateways: Vec::new(),
        }
        .update(layout)
    }

    /// The plan for `layout` that changes as little of `self` as possible:
    /// gateways whose members did not change keep their plan, and members
    /// that stay keep their shard unless their gateway crosses the threshold.
    pub fn update(&self, layout: &Layout) -> Plan {
        let prev: BTreeMap<u32, &GatewayPlan> = self.gateways.iter().map(|g| (g.gateway, g)).collect();
        let limits = self.limits;
        let mut gateways: Vec<GatewayPlan> = layout
            .regions
            .iter()
            .enumerate()
            .flat_map(|(r, gws)| gws.iter().map(move |g| (r, g)))
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(r, g)| match prev.get(&g.gateway) {
                Some(p) => updated(p, g, r, &limits),
                None => fresh(g, r, &limits),
            })
            .collect();
        gateways.sort_by_key(|g| g.gateway);
        Plan { limits, gateways }
    }

    /// Copies of one message at each tier under `topology`, for the worst
    /// place to publish it from.
    ///
    /// Flat: gateway `id` connects to hub server `id % hub`.
    /// Tiered: region `r`'s leaf node connects to hub server `r % hub`.
    /// The server a message enters sends it to its own interested
    /// connections and once over each route to another server with
    /// interest; JetStream's replication copies (replicas - 1, the same in
    /// both layouts) are not counted.
    pub fn load(&self, topology: &Topology) -> Load {
        let hub = topology.hub_servers.max(1);
        let mut load = Load::default();
        // Interested connections per hub server, and per leaf node.
        let mut hub_conns = vec![0usize; hub];
        let mut leaf_conns: BTreeMap<usize, usize> = BTreeMap::new();
        for g in &self.gateways {
            if topology.leaf_nodes {
                *leaf_conns.entry(g.region).or_default() += 1;
            } else {
                hub_conns[g.gateway as usize % hub] += 1;
                load.wan += usize::from(g.region != 0);
            }
            load.gateway = load.gateway.max(g.members());
            let core = g.busiest_core(topology.cores);
            if core > load.core {
                load.core = core;
                load.core_shards = if g.sharded { g.shards.len() } else { 0 };
            }
        }
        if topology.leaf_nodes {
            for region in leaf_conns.keys() {
                hub_conns[region % hub] += 1;
            }
            // A leaf node sends one copy per local gateway, plus the
            // publish up its link to the hub's stream when it was published
            // behind it (the stream's republish comes back down once).
            load.leaf_node = leaf_conns.values().map(|n| n + 1).max().unwrap_or(0);
            load.leaf_link = usize::from(!leaf_conns.is_empty());
            load.wan = leaf_conns.keys().filter(|&&r| r != 0).count();
        }
        let with_interest = hub_conns.iter().filter(|&&n| n > 0).count();
        // As the entry server: its own connections plus a route copy to
        // every other interested server.
        load.hub_server = (0..hub)
            .map(|s| hub_conns[s] + with_interest - usize::from(hub_conns[s] > 0))
            .max()
            .unwrap_or(0);
        let hub_total: usize = hub_conns.iter().sum::<usize>() + with_interest.saturating_sub(1);
        let leaf_total: usize = leaf_conns.values().sum::<usize>() + usize::from(!leaf_conns.is_empty());
        load.nats_total = hub_total + leaf_total;
        load
    }
}

/// Per-hop costs that turn copies into latency (microseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// One NATS hop (client to server, route or leaf link), including the
    /// server's routing of the message.
    pub nats_hop_us: f64,
    /// Each further copy a NATS server writes for one message.
    pub nats_copy_us: f64,
    /// One delivery on a gateway core (queue into the outbox and write).
    pub delivery_us: f64,
    /// Scheduling one shard of a split room (task hand-off, locks).
    pub shard_us: f64,
}

/// Added latency of the last receiver at each tier, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub hub_us: f64,
    pub region_us: f64,
    pub node_us: f64,
}

impl Latency {
    pub fn total_us(&self) -> f64 {
        self.hub_us + self.region_us + self.node_us
    }
}

impl Costs {
    /// The latency the last receiver of each tier waits for, from `load`:
    /// a hop plus every copy queued before its own at the busiest sender.
    pub fn latency(&self, load: &Load, topology: &Topology) -> Latency {
        // Into the hub and across one route.
        let hub_us = 2.0 * self.nats_hop_us + load.hub_server as f64 * self.nats_copy_us;
        let region_us = if topology.leaf_nodes {
            self.nats_hop_us + load.leaf_node as f64 * self.nats_copy_us
        } else {
            0.0
        };
        let node_us = load.core as f64 * self.delivery_us + load.core_shards as f64 * self.shard_us;
        Latency {
            hub_us,
            region_us,
            node_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(per_gateway: &[&[usize]]) -> Layout {
        let mut next = 0u64;
        let mut gw = 0u32;
        Layout {
            regions: per_gateway
                .iter()
                .map(|region| {
                    region
                        .iter()
                        .map(|&n| {
                            let members = (next..next + n as u64).collect();
                            next += n as u64;
                            gw += 1;
                            GatewayMembers { gateway: gw, members }
                        })
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn capacity_and_shard_counts() {
        let l = Limits::default();
        assert_eq!(l.shard_capacity(), 625);
        assert_eq!(l.shards_for(10_000), 0);
        assert_eq!(l.shards_for(10_001), 17);
        assert_eq!(l.shards_for(100_000), 160);
        let odd = Limits {
            tree_threshold: 10,
            tree_degree: 3,
        };
        assert_eq!(odd.shard_capacity(), 4);
        assert_eq!(odd.shards_for(11), 3);
    }

    #[test]
    fn leaf_nodes_cut_hub_copies_to_one_per_region() {
        let l = layout(&[&[100, 100, 100, 100], &[100, 100, 100, 100]]);
        let plan = Plan::new(&l, Limits::default());
        let flat = plan.load(&Topology {
            hub_servers: 3,
            leaf_nodes: false,
            cores: 2,
        });
        let tiered = plan.load(&Topology {
            hub_servers: 3,
            leaf_nodes: true,
            cores: 2,
        });
        // Flat: 8 gateways over 3 servers (3, 3, 2) + 2 routes.
        assert_eq!(flat.hub_server, 5);
        assert_eq!((flat.leaf_node, flat.leaf_link), (0, 0));
        // Tiered: 2 leaf links on 2 servers, 1 route; 4 gateways + 1 up per leaf.
        assert_eq!(tiered.hub_server, 2);
        assert_eq!((tiered.leaf_node, tiered.leaf_link), (5, 1));
        assert_eq!(tiered.gateway, 100);
    }

    #[test]
    fn sharding_spreads_the_busiest_core() {
        let l = layout(&[&[20_000]]);
        let plan = Plan::new(&l, Limits::default());
        let g = &plan.gateways[0];
        assert!(g.sharded);
        assert_eq!(g.shards.len(), 32);
        assert_eq!(g.busiest_core(1), 20_000);
        assert_eq!(g.busiest_core(2), 10_000);
        assert_eq!(g.busiest_core(8), 2_500);
    }
}
