//! DNS as a program without an SDK sees it: `roster dev` serves it, `roster publish` publishes,
//! and Debian's `dig` asks — records of three instances, a change, negative answers, a
//! 200-instance service over TCP after a truncated UDP answer, and malformed packets that are
//! counted and disturb no one.

mod support;

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use roster_client::{Client, ClientConfig};
use support::{Proc, http_get, roster, wait_for};

const START: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(15);

/// `dig @HOST -p PORT ARGS...`: its output.
fn dig(dns: &str, args: &[&str]) -> String {
    let (host, port) = dns.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .args([&format!("@{host}"), "-p", port, "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig runs (Debian's dnsutils package: apt-get install dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short`, its lines sorted.
fn short(dns: &str, name: &str, qtype: &str) -> Vec<String> {
    let mut lines: Vec<String> = dig(dns, &["+short", name, qtype])
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// `roster dev` in `cwd`: the process, the session's DNS and HTTP addresses.
fn dev(cwd: &Path) -> (Proc, String, String) {
    let dev = roster("roster dev", cwd, &["dev"]);
    let (mut dns, mut http) = (None, None);
    loop {
        let line = dev.line_matching(START, "server lines and ready", |l| {
            l.starts_with("roster dev")
        });
        if line.contains("ready") {
            break;
        }
        if let Some(addr) = support::dns_addr(&line) {
            dns = Some(addr);
            http = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
                .map(str::to_owned);
        }
    }
    let line = dev.line_matching(START, "the dns line", |l| l.starts_with("roster dev: dns="));
    let dns = dns.expect("the session line names dns=");
    assert!(line.contains(&format!("dns={dns}")), "{line}");
    (dev, dns, http.unwrap())
}

#[test]
fn dig_resolves_what_roster_publish_publishes_and_sees_it_change() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (_dev, dns, _) = dev(cwd);
    let publishers: Vec<Proc> = (1..=3)
        .map(|i| {
            let addr = format!("10.5.0.{i}:80{i}");
            let attr = format!("rack=r{i}");
            roster(
                "roster publish",
                cwd,
                &["publish", "web", &addr, "--attr", &attr],
            )
        })
        .collect();
    let srv = wait_for(DEADLINE, "three SRV records", || {
        let srv = short(&dns, "web.roster.", "SRV");
        (srv.len() == 3).then_some(srv)
    });
    assert_eq!(
        srv,
        [
            "0 1 801 0a050001.addr.roster.",
            "0 1 802 0a050002.addr.roster.",
            "0 1 803 0a050003.addr.roster."
        ]
    );
    let full = dig(&dns, &["web.roster.", "SRV"]);
    assert!(
        full.contains("status: NOERROR") && full.contains(" aa"),
        "{full}"
    );
    assert!(
        full.contains("0a050002.addr.roster.\t5\tIN\tA\t10.5.0.2"),
        "the additional section holds the targets' addresses: {full}"
    );
    assert_eq!(
        short(&dns, "web.roster.", "A"),
        ["10.5.0.1", "10.5.0.2", "10.5.0.3"]
    );
    let txt = short(&dns, "web.roster.", "TXT");
    assert_eq!(txt.len(), 3, "{txt:?}");
    assert!(
        txt.iter()
            .any(|t| t.contains("\"endpoint=10.5.0.2:802\"") && t.contains("\"rack=r2\"")),
        "{txt:?}"
    );
    let nx = dig(&dns, &["nobody.roster.", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("SOA\tns.roster. hostmaster.roster."), "{nx}");

    // One publisher stops (SIGTERM unpublishes): dig sees it gone within the TTL and the push.
    let stopped = Instant::now();
    publishers[2].signal("TERM");
    wait_for(DEADLINE, "two A records", || {
        (short(&dns, "web.roster.", "A") == ["10.5.0.1", "10.5.0.2"]).then_some(())
    });
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(5 + 1), "seen after {took:?}");

    // All gone: the service exists with no instance, NOERROR without records.
    drop(publishers);
    let empty = wait_for(DEADLINE, "no SRV record", || {
        let out = dig(&dns, &["web.roster.", "SRV"]);
        out.contains("ANSWER: 0,").then_some(out)
    });
    assert!(empty.contains("status: NOERROR"), "{empty}");
}

#[test]
fn a_200_instance_service_comes_over_tcp_after_a_truncated_udp_answer() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (_dev, dns, http) = dev(cwd);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = ClientConfig::load(&cwd.join(".roster/client.toml")).unwrap();
    let (_client, _publications) = runtime.block_on(async {
        let client = Client::connect(config).await.unwrap();
        let mut publications = Vec::new();
        for i in 0..200u32 {
            let addr = format!("10.6.{}.{}:{}", i / 100, i % 100, 7000 + i);
            publications.push(client.publish("big", vec![addr.into()]).await.unwrap());
        }
        (client, publications)
    });
    wait_for(DEADLINE, "all 200 instances", || {
        (short(&dns, "big.roster.", "A").len() == 200).then_some(())
    });

    // Without EDNS the answer must fit 512 bytes: truncated, marked so.
    let udp = dig(&dns, &["+ignore", "+noedns", "big.roster.", "SRV"]);
    assert!(
        udp.contains("flags: qr tc aa") || udp.contains(" tc "),
        "{udp}"
    );
    // dig then asks over TCP by itself and gets all 200.
    let tcp = dig(&dns, &["big.roster.", "SRV"]);
    assert!(tcp.contains("Truncated, retrying in TCP mode"), "{tcp}");
    assert!(tcp.contains("ANSWER: 200,"), "{tcp}");
    assert_eq!(tcp.matches("\tIN\tSRV\t").count(), 200);

    // Malformed packets from one socket are dropped and counted; dig is answered meanwhile.
    let bad = UdpSocket::bind("127.0.0.1:0").unwrap();
    for round in 0..20u8 {
        for garbage in [
            &[round][..],
            &[0xff; 12],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        ] {
            bad.send_to(garbage, &dns).unwrap();
        }
        assert_eq!(short(&dns, "big.roster.", "A").len(), 200);
    }
    wait_for(DEADLINE, "the malformed packets counted", || {
        let (_, metrics) = http_get(&format!("{http}/metrics"))?;
        let dropped: f64 = metrics
            .lines()
            .find(|l| l.starts_with("roster_dns_dropped_total{reason=\"malformed\"}"))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (dropped >= 60.0).then_some(())
    });
    bad.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(bad.recv_from(&mut buf).is_err(), "no answer to garbage");
}
