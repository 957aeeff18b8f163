//! Property tests of the tiered fan-out planner (`fanout_tree::plan`).

use std::collections::BTreeMap;

use fanout_tree::plan::{GatewayMembers, Layout, Limits, Plan, Topology};
use proptest::prelude::*;

/// Members per gateway per region (small counts, thresholds to match) and
/// the limits.
fn inputs() -> impl Strategy<Value = (Vec<Vec<usize>>, Limits)> {
    let counts = prop::collection::vec(prop::collection::vec(0usize..80, 1..5), 1..4);
    let limits = (1usize..40, 2usize..9).prop_map(|(t, d)| Limits {
        tree_threshold: t,
        tree_degree: d,
    });
    (counts, limits)
}

/// A layout with unique member ids, scattered (not sorted) within gateways.
fn layout(counts: &[Vec<usize>]) -> Layout {
    let mut next = 0u64;
    let mut gw = 0u32;
    Layout {
        regions: counts
            .iter()
            .map(|region| {
                region
                    .iter()
                    .map(|&n| {
                        // Ids far apart and in a scrambled order.
                        let mut members: Vec<u64> = (0..n as u64).map(|i| (next + i) * 7919 % 1_000_003).collect();
                        members.reverse();
                        next += n as u64;
                        gw += 1;
                        GatewayMembers { gateway: gw, members }
                    })
                    .collect()
            })
            .collect(),
    }
}

fn all_members(layout: &Layout) -> Vec<u64> {
    let mut v: Vec<u64> = layout
        .regions
        .iter()
        .flatten()
        .flat_map(|g| g.members.iter().copied())
        .collect();
    v.sort_unstable();
    v
}

fn reached(plan: &Plan) -> Vec<u64> {
    let mut v: Vec<u64> = plan
        .gateways
        .iter()
        .flat_map(|g| g.shards.iter().flatten().copied())
        .collect();
    v.sort_unstable();
    v
}

/// Shard of every member: member -> (gateway, shard index).
fn placement(plan: &Plan) -> BTreeMap<u64, (u32, usize)> {
    let mut out = BTreeMap::new();
    for g in &plan.gateways {
        for (i, s) in g.shards.iter().enumerate() {
            for m in s {
                out.insert(*m, (g.gateway, i));
            }
        }
    }
    out
}

fn check_bounds(plan: &Plan, fresh: bool) -> Result<(), TestCaseError> {
    let cap = plan.limits.shard_capacity();
    for g in &plan.gateways {
        let n = g.members();
        prop_assert!(n > 0, "gateways without members are not planned");
        if g.sharded {
            prop_assert!(g.shards.iter().all(|s| s.len() <= cap), "shard over capacity {cap}");
            prop_assert!(!plan.limits.unsharded(n), "a sharded gateway below the merge point");
            if fresh {
                prop_assert!(plan.limits.sharded(n));
                prop_assert_eq!(g.shards.len(), plan.limits.shards_for(n));
                prop_assert!(g.shards.iter().all(|s| !s.is_empty()));
                let (min, max) = (
                    g.shards.iter().map(Vec::len).min().unwrap(),
                    g.shards.iter().map(Vec::len).max().unwrap(),
                );
                prop_assert!(max - min <= 1, "fresh shards are even");
            }
        } else {
            prop_assert_eq!(g.shards.len(), 1);
            prop_assert!(!plan.limits.sharded(n), "inline only up to the threshold");
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn every_member_is_reached_exactly_once((counts, limits) in inputs()) {
        let l = layout(&counts);
        let plan = Plan::new(&l, limits);
        prop_assert_eq!(reached(&plan), all_members(&l));
        check_bounds(&plan, true)?;
    }

    #[test]
    fn same_input_same_plan((counts, limits) in inputs()) {
        let l = layout(&counts);
        let a = Plan::new(&l, limits);
        prop_assert_eq!(&a, &Plan::new(&l, limits));
        // Member order within a gateway does not matter.
        let mut shuffled = l.clone();
        for g in shuffled.regions.iter_mut().flatten() {
            g.members.sort_unstable();
        }
        prop_assert_eq!(&a, &Plan::new(&shuffled, limits));
        prop_assert_eq!(a.update(&l), a.update(&l));
    }

    #[test]
    fn one_gateway_changing_moves_nothing_else(
        (counts, limits) in inputs(),
        pick in any::<prop::sample::Index>(),
        leave in 0usize..30,
        join in 0usize..30,
    ) {
        let before = layout(&counts);
        let plan = Plan::new(&before, limits);
        // Change one gateway: some members leave, new ones join.
        let mut after = before.clone();
        let gws: Vec<&mut GatewayMembers> = after.regions.iter_mut().flatten().collect();
        let n = gws.len();
        let changed = gws.into_iter().nth(pick.index(n)).unwrap();
        let id = changed.gateway;
        let keep = changed.members.len().saturating_sub(leave);
        changed.members.truncate(keep);
        changed.members.extend((0..join as u64).map(|i| 2_000_000 + i));
        let next = plan.update(&after);

        prop_assert_eq!(reached(&next), all_members(&after));
        check_bounds(&next, false)?;
        // Other gateways: the same plan.
        for g in &next.gateways {
            if g.gateway != id {
                prop_assert!(plan.gateways.contains(g));
            }
        }
        // The changed gateway: members that stay keep their shard unless it
        // crossed the threshold (then it is planned afresh).
        let old = plan.gateways.iter().find(|g| g.gateway == id);
        let new = next.gateways.iter().find(|g| g.gateway == id);
        if let (Some(o), Some(n)) = (old, new)
            && o.sharded
            && n.sharded
        {
            let (po, pn) = (placement(&plan), placement(&next));
            for (m, at) in &pn {
                if let Some(was) = po.get(m) {
                    prop_assert_eq!(was, at, "member {} moved", m);
                }
            }
            // Shards only grow by what joined.
            prop_assert!(n.shards.len() <= o.shards.len() + join.div_ceil(limits.shard_capacity()));
        }
        // NATS copies move by at most one connection and one route.
        for leaf_nodes in [false, true] {
            let t = Topology { hub_servers: 3, leaf_nodes, cores: 2 };
            let (a, b) = (plan.load(&t), next.load(&t));
            prop_assert!(a.hub_server.abs_diff(b.hub_server) <= 2);
            // One gateway more, or (a region's first) its leaf node's up copy too.
            prop_assert!(a.leaf_node.abs_diff(b.leaf_node) <= 2);
            prop_assert!(b.leaf_link <= 1, "one copy per leaf link");
        }
    }

    #[test]
    fn an_unchanged_layout_keeps_its_plan((counts, limits) in inputs()) {
        let l = layout(&counts);
        let plan = Plan::new(&l, limits);
        prop_assert_eq!(plan.update(&l), plan);
    }
}
