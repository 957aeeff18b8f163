//! The tiered fan-out simulator: runs `fanout_tree::plan` for rooms of 10K to
//! 1M members on 10 to 1,000 gateways in 1 to 10 regions, flat versus tiered,
//! and prints one Markdown table (the one in `docs/fanout-tree.md`).
//!
//! `cargo run --release -p fanout-tree --example simulate [-- OPTIONS]`
//!
//! Options (all optional): `--cores N` per gateway (default 8), `--hub N`
//! NATS servers in the hub (default 3), `--skew S` Zipf exponent of member
//! placement over gateways (default 1.0), `--gateway-cap N` most members one
//! gateway holds (default 100000), `--threshold T` and `--degree K` (the
//! gateway's `--tree-threshold` / `--tree-degree`, default 10000 / 16), and the
//! per-hop costs in microseconds `--hop-us`, `--copy-us`, `--delivery-us`,
//! `--shard-us` (defaults: measured on this project's machine, see the doc).
//!
//! Placement: gateway `i` (1-based) gets a share of the members proportional
//! to `1 / i^skew`, capped at `--gateway-cap` (the excess goes to the next
//! gateways with room); gateway `i` is in region `i % regions`.

use fanout_tree::plan::{Costs, GatewayMembers, Layout, Limits, Plan, Topology};

struct Args {
    cores: usize,
    hub: usize,
    skew: f64,
    gateway_cap: usize,
    limits: Limits,
    costs: Costs,
}

fn parse() -> Args {
    let mut a = Args {
        cores: 8,
        hub: 3,
        skew: 1.0,
        gateway_cap: 100_000,
        limits: Limits::default(),
        costs: Costs {
            nats_hop_us: 60.0,
            nats_copy_us: 0.6,
            delivery_us: 3.0,
            shard_us: 5.0,
        },
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [flag, value] = pair else {
            panic!("options come in pairs: --flag value");
        };
        let num = |v: &str| -> f64 { v.parse().unwrap_or_else(|_| panic!("{flag}: not a number: {v}")) };
        let v = num(value);
        match flag.as_str() {
            "--cores" => a.cores = v as usize,
            "--hub" => a.hub = v as usize,
            "--skew" => a.skew = v,
            "--gateway-cap" => a.gateway_cap = v as usize,
            "--threshold" => a.limits.tree_threshold = v as usize,
            "--degree" => a.limits.tree_degree = v as usize,
            "--hop-us" => a.costs.nats_hop_us = v,
            "--copy-us" => a.costs.nats_copy_us = v,
            "--delivery-us" => a.costs.delivery_us = v,
            "--shard-us" => a.costs.shard_us = v,
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// Members per gateway: Zipf shares, capped, the excess moved on.
fn placement(members: usize, gateways: usize, skew: f64, cap: usize) -> Vec<usize> {
    let weights: Vec<f64> = (1..=gateways).map(|i| 1.0 / (i as f64).powf(skew)).collect();
    let total: f64 = weights.iter().sum();
    let mut counts: Vec<usize> = weights
        .iter()
        .map(|w| ((members as f64) * w / total).floor() as usize)
        .collect();
    let mut left = members - counts.iter().sum::<usize>();
    // Rounding remainder to the biggest shares first.
    for c in counts.iter_mut() {
        if left == 0 {
            break;
        }
        *c += 1;
        left -= 1;
    }
    // Cap, then hand the excess to gateways with room, in order.
    let mut excess = 0;
    for c in counts.iter_mut() {
        if *c > cap {
            excess += *c - cap;
            *c = cap;
        }
    }
    for c in counts.iter_mut() {
        let take = excess.min(cap - *c);
        *c += take;
        excess -= take;
    }
    assert_eq!(
        excess, 0,
        "{members} members do not fit on {gateways} gateways of {cap}"
    );
    counts
}

fn layout(counts: &[usize], regions: usize) -> Layout {
    let mut l = Layout {
        regions: vec![Vec::new(); regions],
    };
    let mut next = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        let members = (next..next + n as u64).collect();
        next += n as u64;
        l.regions[i % regions].push(GatewayMembers {
            gateway: i as u32,
            members,
        });
    }
    l
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn main() {
    let a = parse();
    println!(
        "cores/gateway {}, hub servers {}, skew {}, gateway cap {}, threshold {}, degree {} (shard <= {}), costs: hop {} us, copy {} us, delivery {} us, shard {} us",
        a.cores,
        a.hub,
        a.skew,
        a.gateway_cap,
        a.limits.tree_threshold,
        a.limits.tree_degree,
        a.limits.shard_capacity(),
        a.costs.nats_hop_us,
        a.costs.nats_copy_us,
        a.costs.delivery_us,
        a.costs.shard_us
    );
    println!();
    println!(
        "| members | gateways | regions | busiest gateway | NATS server flat / tiered | leaf node / link | WAN copies flat / tiered | core flat / tiered (shards) | hub ms flat / tiered | region ms | node ms flat / tiered | total ms flat / tiered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for members in [10_000usize, 100_000, 1_000_000] {
        for gateways in [10usize, 100, 1_000] {
            if members > gateways * a.gateway_cap {
                continue;
            }
            for regions in [1usize, 3, 10] {
                let counts = placement(members, gateways, a.skew, a.gateway_cap);
                let l = layout(&counts, regions);
                let flat_limits = Limits {
                    tree_threshold: usize::MAX,
                    ..a.limits
                };
                let flat_plan = Plan::new(&l, flat_limits);
                let tiered_plan = Plan::new(&l, a.limits);
                let flat_topo = Topology {
                    hub_servers: a.hub,
                    leaf_nodes: false,
                    cores: a.cores,
                };
                let tiered_topo = Topology {
                    leaf_nodes: true,
                    ..flat_topo
                };
                let flat = flat_plan.load(&flat_topo);
                let tiered = tiered_plan.load(&tiered_topo);
                let fl = a.costs.latency(&flat, &flat_topo);
                let tl = a.costs.latency(&tiered, &tiered_topo);
                println!(
                    "| {members} | {gateways} | {regions} | {} | {} / {} | {} / {} | {} / {} | {} / {} ({}) | {} / {} | {} | {} / {} | {} / {} |",
                    tiered.gateway,
                    flat.hub_server,
                    tiered.hub_server.max(tiered.leaf_node),
                    tiered.leaf_node,
                    tiered.leaf_link,
                    flat.wan,
                    tiered.wan,
                    flat.core,
                    tiered.core,
                    tiered.core_shards,
                    ms(fl.hub_us),
                    ms(tl.hub_us),
                    ms(tl.region_us),
                    ms(fl.node_us),
                    ms(tl.node_us),
                    ms(fl.total_us()),
                    ms(tl.total_us()),
                );
            }
        }
    }
}
