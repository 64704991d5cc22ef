//! What a subscriber pays per publisher change: decoding a delta push, applying it to the shared
//! snapshot while readers still hold the previous one, working out the events, and dropping the
//! snapshot readers are done with. One thread, no network: the SDK's own cost, per publisher.
//!
//!     cargo bench -p roster-client --bench apply_pushes
//!     ROSTER_BENCH_PUTS=20 cargo bench -p roster-client --bench apply_pushes   # publishers per delta
//!
//! Each delta replaces `PUTS` publishers of a service of 100 (then 1,000) held by 20 clients, the
//! way a rollout's registrations arrive; the figures are the best of seven passes of 20,000 deltas.

use std::time::{Duration, Instant};

use bytes::Bytes;
use roster_client::{PublisherView, Snapshot, diff};
use roster_common::frame::{self, HEADER_LEN};
use roster_common::proto::{Delta, Push};
use roster_common::{ServiceId, push};

const DELTAS: usize = 20_000;
const PASSES: usize = 7;

fn view(client_id: &str, register_id: &str, version: u64) -> PublisherView {
    PublisherView {
        health: None,
        persistent: false,
        client_id: client_id.into(),
        register_id: register_id.into(),
        data: vec![Bytes::from(format!("10.0.{}:8080", version % 250))],
        attributes: Default::default(),
        client_version: version,
    }
}

/// Per publisher, in nanoseconds: general decoder, push decoder, apply, events, drop.
fn pass(service: &ServiceId, start: &Snapshot, frames: &[Bytes], puts: usize) -> [f64; 5] {
    let mut spent = [Duration::ZERO; 5];
    let mut latest = start.clone();
    // What a reader holds: the snapshot before the one being made.
    let mut held = latest.clone();
    for (i, frame) in frames.iter().cycle().take(DELTAS).enumerate() {
        let body = &frame[HEADER_LEN..];
        let t0 = Instant::now();
        let general: Push = frame::decode(body).expect("a delta");
        let t1 = Instant::now();
        let Ok(Push::Delta(mut delta)) = push::decode(body) else {
            panic!("a delta")
        };
        let t2 = Instant::now();
        drop(general);
        delta.base = latest.version;
        delta.version = latest.version + 1;
        let t3 = Instant::now();
        assert!(latest.apply(delta), "delta {i} applies");
        let new = latest.clone();
        let t4 = Instant::now();
        let events = diff(&held, &new);
        let t5 = Instant::now();
        assert_eq!(events.len(), puts);
        drop(events);
        held = new;
        let t6 = Instant::now();
        for (slot, d) in spent
            .iter_mut()
            .zip([t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5])
        {
            *slot += d;
        }
    }
    assert_eq!(&latest.service, service);
    spent.map(|d| d.as_nanos() as f64 / (DELTAS * puts) as f64)
}

fn main() {
    let puts: usize = std::env::var("ROSTER_BENCH_PUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let service: ServiceId = "default/DEFAULT_GROUP/payments".parse().unwrap();
    let clients: Vec<String> = (0..20).map(|i| format!("{i:032x}")).collect();
    println!(
        "per publisher changed, {puts} per delta (best of {PASSES} passes of {DELTAS} deltas)"
    );
    println!(
        "{:>10} {:>14} {:>14} {:>9} {:>9} {:>9} {:>9}",
        "instances", "decode serde", "decode push", "apply", "events", "drop", "total"
    );
    for instances in [100usize, 1000] {
        let views: Vec<PublisherView> = (0..instances)
            .map(|i| view(&clients[i % clients.len()], &format!("i{i}"), 1))
            .collect();
        let start = Snapshot::from_wire(roster_common::proto::Snapshot {
            service: service.clone(),
            version: 1,
            publishers: views.clone(),
        });
        // Deltas of consecutive registrations, so each lands in a different part of the map.
        let frames: Vec<Bytes> = (0..1000)
            .map(|r| {
                let mut put: Vec<PublisherView> = (0..puts)
                    .map(|j| {
                        let old = &views[(r * puts + j) % instances];
                        view(&old.client_id, &old.register_id, (r + 2) as u64)
                    })
                    .collect();
                put.sort_by(|a, b| {
                    (&a.client_id, &a.register_id).cmp(&(&b.client_id, &b.register_id))
                });
                let delta = Delta {
                    service: service.clone(),
                    base: 0,
                    version: 0,
                    put,
                    removed: vec![],
                };
                frame::encode(&Push::Delta(delta), u32::MAX).expect("encodes")
            })
            .collect();
        let mut best = [f64::MAX; 5];
        for _ in 0..PASSES {
            for (b, ns) in best.iter_mut().zip(pass(&service, &start, &frames, puts)) {
                *b = b.min(ns);
            }
        }
        // The client decodes with the push decoder only.
        let total: f64 = best[1..].iter().sum();
        println!(
            "{instances:>10} {:>11.0} ns {:>11.0} ns {:>6.0} ns {:>6.0} ns {:>6.0} ns {:>6.0} ns",
            best[0], best[1], best[2], best[3], best[4], total
        );
    }
}
