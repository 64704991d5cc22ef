//! A subscriber application that is deliberately slow, for the tests: the one thread its runtime
//! has busy-loops in its consumer for a while, so nothing of the application runs meanwhile.
//!
//! `roster-slow-app CONFIG OWN_SERVICE OWN_PUBLISHERS WATCHED_SERVICE BUSY_MS EXPECTED`: publishes
//! OWN_PUBLISHERS instances of OWN_SERVICE (register ids `slow-0` …), subscribes to
//! WATCHED_SERVICE and prints `ready`; on the first snapshot of WATCHED_SERVICE with a publisher
//! it spins for BUSY_MS; once it has seen EXPECTED publishers there it prints its client's
//! statistics as `stats KEY=VALUE ...` and exits.

use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roster_client::{Client, ClientConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, own, count, watched, busy_ms, expected] = &args[..] else {
        anyhow::bail!(
            "usage: roster-slow-app CONFIG OWN_SERVICE OWN_PUBLISHERS WATCHED_SERVICE BUSY_MS EXPECTED"
        );
    };
    let count: usize = count.parse()?;
    let busy = Duration::from_millis(busy_ms.parse()?);
    let expected: usize = expected.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = Client::connect(ClientConfig::load(config.as_ref())?).await?;
        let mut mine = Vec::new();
        for i in 0..count {
            mine.push(
                client
                    .publisher(own)
                    .register_id(format!("slow-{i}"))
                    .publish(vec![format!("10.9.0.{i}:80").into()])
                    .await?,
            );
        }
        let mut watching = client.subscribe(watched).await?;
        println!("ready");
        std::io::stdout().flush()?;
        let mut spun = None;
        while let Some(snapshot) = watching.next().await {
            if spun.is_none() && !snapshot.publishers.is_empty() {
                // The application's only thread is busy: no task of it runs until this ends.
                let start = Instant::now();
                while start.elapsed() < busy {
                    std::hint::spin_loop();
                }
                spun = Some(start.elapsed());
            }
            if snapshot.publishers.len() >= expected {
                break;
            }
        }
        let s = client.stats();
        println!(
            "stats reconnects={} lost={} silent={} cut_off_slow={} snapshots={} deltas={} resyncs={} busy_ms={}",
            s.reconnects,
            s.lost,
            s.silent,
            s.cut_off_slow,
            s.snapshots,
            s.deltas,
            s.resyncs,
            spun.map_or(0, |d| d.as_millis())
        );
        std::io::stdout().flush()?;
        drop(mine);
        client.close().await;
        anyhow::Ok(())
    })
}
