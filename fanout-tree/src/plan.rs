//! The tiered fan-out planner: which gateway forwards a room's message to which.
//!
//! Pure planning: (origin, nodes with members, degree) -> [`FanoutPlan`]. No
//! I/O, no clocks, no randomness, so every node computes the same plan from the
//! same inputs. Gateway relay trees use it in a later stage; today a node
//! with members receives each message straight from the bus (a plan of depth 1).

use std::collections::BTreeMap;

/// A gateway node's identifier in a plan.
pub type NodeName = String;

/// Who forwards to whom for one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutPlan {
    /// The node that receives the message first (the publisher's bus delivery).
    pub root: NodeName,
    /// For each forwarding node, the nodes it sends to, in order.
    pub children: BTreeMap<NodeName, Vec<NodeName>>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("fan-out degree must be at least 2")]
    DegreeTooSmall,
}

impl FanoutPlan {
    /// Builds a breadth-first `degree`-ary tree rooted at `root` over the
    /// nodes that have members (sorted, so the plan is deterministic).
    pub fn build(root: &str, members: &BTreeMap<NodeName, usize>, degree: usize) -> Result<Self, PlanError> {
        if degree < 2 {
            return Err(PlanError::DegreeTooSmall);
        }
        let mut order: Vec<NodeName> = vec![root.to_owned()];
        order.extend(
            members
                .iter()
                .filter(|(n, c)| **c > 0 && n.as_str() != root)
                .map(|(n, _)| n.clone()),
        );
        let mut children: BTreeMap<NodeName, Vec<NodeName>> = BTreeMap::new();
        for (i, node) in order.iter().enumerate().skip(1) {
            let parent = &order[(i - 1) / degree];
            children.entry(parent.clone()).or_default().push(node.clone());
        }
        Ok(Self {
            root: root.to_owned(),
            children,
        })
    }

    /// Number of hops from the root to the deepest node.
    pub fn depth(&self) -> usize {
        fn walk(plan: &FanoutPlan, node: &str) -> usize {
            plan.children
                .get(node)
                .map_or(0, |c| 1 + c.iter().map(|n| walk(plan, n)).max().unwrap_or(0))
        }
        walk(self, &self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for property-style tests.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn every_node_with_members_is_reached_exactly_once_and_depth_is_logarithmic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..500 {
            let n = (xorshift(&mut seed) % 200) as usize + 1;
            let degree = (xorshift(&mut seed) % 8) as usize + 2;
            let members: BTreeMap<NodeName, usize> = (0..n)
                .map(|i| (format!("gw-{i}"), (xorshift(&mut seed) % 3) as usize))
                .collect();
            let plan = FanoutPlan::build("gw-0", &members, degree).unwrap();
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for kids in plan.children.values() {
                for k in kids {
                    *seen.entry(k.as_str()).or_default() += 1;
                }
            }
            for (node, count) in &members {
                let expected = usize::from(*count > 0 && node != "gw-0");
                assert_eq!(seen.get(node.as_str()).copied().unwrap_or(0), expected, "{node}");
            }
            let reached = seen.len() + 1;
            let mut bound = 0;
            let mut cap = 1;
            while cap < reached {
                bound += 1;
                cap = cap * degree + 1;
            }
            assert!(
                plan.depth() <= bound.max(1) || reached == 1,
                "depth {} > {bound}",
                plan.depth()
            );
            assert!(plan.children.values().all(|c| c.len() <= degree));
        }
    }

    #[test]
    fn degree_below_two_is_refused() {
        assert_eq!(
            FanoutPlan::build("a", &BTreeMap::new(), 1),
            Err(PlanError::DegreeTooSmall)
        );
    }
}
