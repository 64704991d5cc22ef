//! Memory per publisher on a data server: heap bytes held by the slot store for N publishers,
//! counted by a wrapping global allocator. Publishers arrive as they do on the wire (decoded from
//! MessagePack), 100 services, 500 publishers per client, one `host:port` each.
//!
//!     cargo bench -p roster-data --bench bytes_per_publisher            # 100,000 publishers
//!     ROSTER_BENCH_PUBLISHERS=1000000 cargo bench -p roster-data --bench bytes_per_publisher

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use roster_common::proto::{Publisher, SlotTable, WriteOp};
use roster_data::store::Store;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let count: usize = std::env::var("ROSTER_BENCH_PUBLISHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut store = Store::new(1);
    let table = SlotTable {
        epoch: 1,
        slot_count: 256,
        replicas: 1,
        slots: vec![vec![1]; 256],
    };
    let now = Instant::now();
    store.apply_table(&table, now);
    store.open_ready(&HashSet::new(), now, Duration::ZERO);
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    for i in 0..count {
        let publisher = Publisher {
            check: None,
            health: None,
            persistent: false,
            client_id: format!("{:032x}", i / 500),
            register_id: format!("p{}", i % 500 + 1),
            service: format!("prod/payments/service-{}", i % 100)
                .parse()
                .unwrap(),
            data: vec![Bytes::from(format!(
                "10.{}.{}.{}:8080",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            ))],
            attributes: Default::default(),
            client_version: 1,
            session: 1,
            session_instance: 7,
            owner: roster_common::ids::owner_of("c", b"the secret of client c"),
            registered_ms: 0,
        };
        // As received: encoded by the session, decoded here.
        let wire = rmp_serde::to_vec_named(&WriteOp::Put { publisher }).unwrap();
        let op: WriteOp = rmp_serde::from_slice(&wire).unwrap();
        store.write(op).expect("write");
    }
    let elapsed = started.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "{count} publishers: {} bytes held by the store, {:.0} bytes per publisher; {:.0} writes/s (decode + apply, one thread)",
        held,
        held as f64 / count as f64,
        count as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(store.publisher_count(), count);
}
