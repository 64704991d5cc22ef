//! DNS answered by session servers, asked by a real resolver (hickory-resolver) and by raw
//! packets over UDP and TCP: records of a service's instances, negative answers, changes seen
//! within a TTL, truncation then TCP for a big service, and bad input that harms no one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use roster_client::Client;
use roster_common::health::CheckSpec;
use roster_tests::{Cluster, ClusterOptions, DEADLINE, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A resolver asking only `server`, over UDP (and TCP after a truncated answer), or over TCP
/// only. With `cache`, it keeps answers for their TTL, as resolvers do.
fn resolver(server: SocketAddr, tcp_only: bool, cache: bool) -> TokioResolver {
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port();
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let connections = if tcp_only { vec![tcp] } else { vec![udp, tcp] };
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
        server.ip(),
        true,
        connections,
    )]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.timeout = Duration::from_secs(3);
    options.attempts = 1;
    if !cache {
        options.cache_size = 0;
    }
    builder.build().expect("a resolver")
}

/// A query for `name` of `qtype`, as bytes; with `edns`, announcing a 4096-byte buffer.
fn query(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        message.edns = Some(e);
    }
    message.to_vec().unwrap()
}

/// Asks `server` over UDP from `socket` and waits for the answer to `id`.
async fn ask_udp(socket: &UdpSocket, server: SocketAddr, bytes: &[u8], id: u16) -> Message {
    socket.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, _) = tokio::time::timeout(DEADLINE, socket.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        let message = Message::from_vec(&buf[..len]).expect("a DNS message");
        if message.metadata.id == id {
            return message;
        }
    }
}

/// Asks `server` over TCP.
async fn ask_tcp(server: SocketAddr, bytes: &[u8]) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).expect("a DNS message")
}

async fn cluster(ttl_secs: u32) -> Cluster {
    let session: fn(&mut roster_session::SessionConfig) = match ttl_secs {
        1 => |c| c.dns.ttl_secs = 1,
        _ => |c| c.dns.idle = Duration::from_millis(400),
    };
    Cluster::start_with(ClusterOptions {
        dns: true,
        session,
        ..Default::default()
    })
    .await
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_answered_with_srv_a_and_txt_records_and_unknown_names_are_not() {
    let cluster = cluster(5).await;
    let dns = cluster.dns_addrs[0];
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let mut publications = Vec::new();
    for (i, data) in ["10.1.0.1:8080", "10.1.0.2:8081", "db-3.example:5432"]
        .into_iter()
        .enumerate()
    {
        let publication = client
            .publisher("web")
            .attribute("zone", format!("z{i}"))
            .publish(vec![Bytes::from(data)])
            .await
            .unwrap();
        publications.push(publication);
    }
    let _api = client
        .publish("prod/blue/api", vec!["[2001:db8::9]:443".into()])
        .await
        .unwrap();
    // Published once, then gone: the service exists with no instance.
    client
        .publish("drained", vec!["10.9.9.9:1".into()])
        .await
        .unwrap()
        .unpublish()
        .await
        .unwrap();

    let resolver = resolver(dns, false, false);
    // The first query of a service waits for its snapshot; each publish was acknowledged by the
    // slot leader, so the answer holds all three.
    let srv = resolver
        .lookup("web.roster.", RecordType::SRV)
        .await
        .unwrap();
    let mut targets: Vec<(u16, String)> = srv
        .answers()
        .iter()
        .map(|r| match &r.data {
            RData::SRV(srv) => {
                assert_eq!((srv.priority, srv.weight), (0, 1));
                (srv.port, srv.target.to_ascii())
            }
            other => panic!("not an SRV record: {other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            (5432, "db-3.example.".to_owned()),
            (8080, "0a010001.addr.roster.".to_owned()),
            (8081, "0a010002.addr.roster.".to_owned()),
        ]
    );
    assert!(srv.answers().iter().all(|r| r.ttl == 5));
    let additional: Vec<String> = sorted(
        srv.additionals()
            .iter()
            .map(|r| format!("{} {}", r.name, r.data))
            .collect(),
    );
    assert_eq!(
        additional,
        [
            "0a010001.addr.roster. 10.1.0.1",
            "0a010002.addr.roster. 10.1.0.2"
        ]
    );

    let a = resolver.lookup("web.roster.", RecordType::A).await.unwrap();
    let ips: Vec<String> = sorted(a.answers().iter().map(|r| r.data.to_string()).collect());
    assert_eq!(ips, ["10.1.0.1", "10.1.0.2"]);
    // The SRV target's own name resolves to its address.
    let target = resolver
        .lookup("0a010002.addr.roster.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(target.answers()[0].data.to_string(), "10.1.0.2");

    let txt = resolver
        .lookup("WEB.Roster.", RecordType::TXT)
        .await
        .unwrap();
    let txt: Vec<String> = sorted(txt.answers().iter().map(|r| r.data.to_string()).collect());
    assert_eq!(txt.len(), 3, "{txt:?}");
    let ids: Vec<&str> = publications.iter().map(|p| p.register_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(
            txt.iter()
                .any(|t| t.contains(&format!("id={id}")) && t.contains(&format!("zone=z{i}"))),
            "{txt:?} has instance {id} with its attribute"
        );
    }

    let aaaa = resolver
        .lookup("api.blue.prod.roster.", RecordType::AAAA)
        .await
        .unwrap();
    assert_eq!(aaaa.answers()[0].data.to_string(), "2001:db8::9");

    // A service that exists with no instance: NOERROR, no records. One never published to:
    // NXDOMAIN. Both carry the zone's SOA, whose minimum is the TTL.
    let empty = resolver
        .lookup("drained.roster.", RecordType::SRV)
        .await
        .unwrap_err();
    assert!(
        empty.is_no_records_found() && !empty.is_nx_domain(),
        "{empty}"
    );
    let unknown = resolver
        .lookup("nobody.roster.", RecordType::SRV)
        .await
        .unwrap_err();
    assert!(unknown.is_nx_domain(), "{unknown}");
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let nx = ask_udp(
        &socket,
        dns,
        &query(7, "nobody.roster.", RecordType::A, false),
        7,
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    match &nx.authorities[0].data {
        RData::SOA(soa) => assert_eq!(soa.minimum, 5),
        other => panic!("not the SOA: {other:?}"),
    }
    // A web service has no MX: NOERROR without records.
    let mx = ask_udp(
        &socket,
        dns,
        &query(8, "web.roster.", RecordType::MX, false),
        8,
    )
    .await;
    assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
    assert!(mx.answers.is_empty());
    // Names that cannot be a service, and names outside the zone.
    let two = ask_udp(
        &socket,
        dns,
        &query(9, "a.b.roster.", RecordType::A, false),
        9,
    )
    .await;
    assert_eq!(two.metadata.response_code, ResponseCode::NXDomain);
    let outside = ask_udp(
        &socket,
        dns,
        &query(10, "example.com.", RecordType::A, false),
        10,
    )
    .await;
    assert_eq!(outside.metadata.response_code, ResponseCode::Refused);
    assert!(!outside.metadata.authoritative);
    // Only the Internet class is served.
    let mut chaos = Message::from_vec(&query(12, "web.roster.", RecordType::TXT, false)).unwrap();
    chaos.queries[0].set_query_class(hickory_resolver::proto::rr::DNSClass::CH);
    let chaos = ask_udp(&socket, dns, &chaos.to_vec().unwrap(), 12).await;
    assert_eq!(chaos.metadata.response_code, ResponseCode::Refused);

    drop(client);
    cluster.stop().await;
}

/// Polls `resolver` for the A records of `name` until they are `expected`; when they were.
async fn answered(resolver: &TokioResolver, name: &str, expected: &[&str]) -> Instant {
    eventually(DEADLINE, "the change answered", || async {
        let a = resolver.lookup(name, RecordType::A).await.ok()?;
        let got: Vec<String> = sorted(a.answers().iter().map(|r| r.data.to_string()).collect());
        (got == expected).then(Instant::now)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_seen_by_dns_within_one_ttl() {
    let cluster = cluster(1).await;
    let dns = cluster.dns_addrs[0];
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let first = client
        .publish("shop", vec!["10.2.0.1:80".into()])
        .await
        .unwrap();
    // A caching resolver, as clients have, holding the first answer for the TTL (1 s here).
    let resolver = resolver(dns, false, true);
    answered(&resolver, "shop.roster.", &["10.2.0.1"]).await;
    // One TTL of caching in the resolver, plus the push and this poll's own pace.
    let within = Duration::from_millis(1_000 + 500);

    let added = Instant::now();
    let _second = client
        .publish("shop", vec!["10.2.0.2:80".into()])
        .await
        .unwrap();
    let took = answered(&resolver, "shop.roster.", &["10.2.0.1", "10.2.0.2"]).await - added;
    assert!(
        took < within,
        "an added instance was answered after {took:?}"
    );

    let removed = Instant::now();
    first.unpublish().await.unwrap();
    let took = answered(&resolver, "shop.roster.", &["10.2.0.2"]).await - removed;
    assert!(
        took < within,
        "a removed instance was still answered after {took:?}"
    );

    drop(client);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_service_is_truncated_over_udp_and_answered_whole_over_tcp() {
    let cluster = cluster(5).await;
    let dns = cluster.dns_addrs[0];
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let mut publications = Vec::new();
    for i in 0..200u32 {
        let addr = format!("10.3.{}.{}:{}", i / 100, i % 100, 9000 + i);
        publications.push(client.publish("big", vec![addr.into()]).await.unwrap());
    }
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (id, edns) in [(1, false), (2, true)] {
        let udp = ask_udp(
            &socket,
            dns,
            &query(id, "big.roster.", RecordType::SRV, edns),
            id,
        )
        .await;
        assert_eq!(udp.metadata.response_code, ResponseCode::NoError);
        assert!(
            udp.metadata.truncation,
            "200 SRV records do not fit (EDNS {edns})"
        );
        assert!(udp.answers.len() < 200);
    }
    let tcp = ask_tcp(dns, &query(3, "big.roster.", RecordType::SRV, false)).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
    assert_eq!(tcp.additionals.len(), 200, "each target's address");

    // A resolver does the same by itself: truncated over UDP, it asks again over TCP.
    let resolver = resolver(dns, false, false);
    let srv = resolver
        .lookup("big.roster.", RecordType::SRV)
        .await
        .unwrap();
    assert_eq!(srv.answers().len(), 200);
    let a = resolver.lookup("big.roster.", RecordType::A).await.unwrap();
    assert_eq!(a.answers().len(), 200);

    drop(publications);
    drop(client);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_dropped_and_other_clients_are_answered() {
    let cluster = cluster(5).await;
    let dns = cluster.dns_addrs[0];
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let _web = client
        .publish("web", vec!["10.4.0.1:80".into()])
        .await
        .unwrap();

    // Garbage of every kind from one socket, while another asks questions.
    let bad = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut response = Message::from_vec(&query(5, "web.roster.", RecordType::A, false)).unwrap();
    response.metadata.message_type = hickory_resolver::proto::op::MessageType::Response;
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 5],
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01],
        query(6, "web.roster.", RecordType::A, false)[..20].to_vec(),
        // Claims 65,535 questions.
        [&[0, 1, 1, 0, 0xff, 0xff][..], &[0; 6]].concat(),
        (0..4_000u32).map(|i| (i * 7) as u8).collect(),
        response.to_vec().unwrap(),
    ];
    let good = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for round in 0..50u16 {
        for g in &garbage {
            bad.send_to(g, dns).await.unwrap();
        }
        let answer = ask_udp(
            &good,
            dns,
            &query(round, "web.roster.", RecordType::A, false),
            round,
        )
        .await;
        assert_eq!(answer.answers[0].data.to_string(), "10.4.0.1");
    }
    // The garbage got no answer at all: the first thing the bad socket hears is the answer to
    // the one real query it sends.
    let heard = ask_udp(
        &bad,
        dns,
        &query(999, "web.roster.", RecordType::A, false),
        999,
    )
    .await;
    let mut buf = [0u8; 512];
    assert!(
        bad.try_recv_from(&mut buf).is_err(),
        "nothing else was sent to the bad socket"
    );
    assert_eq!(heard.answers.len(), 1);
    // A TCP connection sending garbage is closed; another is answered.
    let mut stream = TcpStream::connect(dns).await.unwrap();
    stream.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed without an answer: {closed:?}"
    );
    let tcp = ask_tcp(dns, &query(11, "web.roster.", RecordType::A, false)).await;
    assert_eq!(tcp.answers.len(), 1);

    drop(client);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_past_its_rate_is_dropped_and_another_is_not() {
    let cluster = Cluster::start_with(ClusterOptions {
        dns: true,
        session: |c| c.dns.qps_per_source = 50,
        ..Default::default()
    })
    .await;
    let dns = cluster.dns_addrs[0];
    let busy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // 150 queries within about 20 ms, in small batches so the server's socket buffer never
    // overflows (the kernel would drop them before the limit is even asked).
    for batch in 0..15u16 {
        for i in 0..10 {
            let id = batch * 10 + i;
            busy.send_to(&query(id, "nobody.roster.", RecordType::A, false), dns)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The busy source got its burst (one second's worth) and little more.
    let mut answers = 0;
    let mut buf = vec![0u8; 512];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), busy.recv_from(&mut buf)).await
    {
        answers += 1;
    }
    assert!((50..=55).contains(&answers), "{answers} of 150 answered");
    // Another source address on the same machine has its own allowance...
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let answer = ask_udp(
        &other,
        dns,
        &query(1, "nobody.roster.", RecordType::A, false),
        1,
    )
    .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    // ...and the busy one is answered again once its rate allows.
    let again = ask_udp(
        &busy,
        dns,
        &query(500, "nobody.roster.", RecordType::A, false),
        500,
    )
    .await;
    assert_eq!(again.metadata.response_code, ResponseCode::NXDomain);
    cluster.stop().await;
}

/// The services DNS watches on session server 1, from its admin status.
async fn watched(cluster: &Cluster) -> Vec<String> {
    let status = cluster.session_admins[0].source().unwrap().status().await;
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_no_one_asks_for_is_no_longer_watched() {
    // Idle after 400 ms.
    let cluster = cluster(5).await;
    let dns = cluster.dns_addrs[0];
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = ask_udp(
        &socket,
        dns,
        &query(1, "quiet.roster.", RecordType::A, false),
        1,
    )
    .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(watched(&cluster).await, ["default/DEFAULT/quiet"]);
    // Asked again and again, it stays.
    let kept_until = Instant::now() + Duration::from_secs(1);
    let mut id = 2;
    while Instant::now() < kept_until {
        ask_udp(
            &socket,
            dns,
            &query(id, "quiet.roster.", RecordType::A, false),
            id,
        )
        .await;
        id += 1;
        assert_eq!(watched(&cluster).await, ["default/DEFAULT/quiet"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Left alone, it goes.
    eventually(DEADLINE, "the idle service dropped", || async {
        watched(&cluster).await.is_empty().then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_healthy_instances_are_answered_until_too_many_fail() {
    let cluster = cluster(5).await;
    let dns = cluster.dns_addrs[0];
    // A port that accepts, and one where nothing listens.
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = live.accept().await {
            drop(stream);
        }
    });
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let check = |target: SocketAddr| CheckSpec {
        target: format!("tcp://{target}"),
        interval_ms: 100,
        timeout_ms: 100,
        rise: 1,
        fall: 1,
    };
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let publish = |data: &'static str, target: SocketAddr| {
        let client = &client;
        async move {
            client
                .publisher("checked")
                .check(check(target))
                .publish(vec![data.into()])
                .await
                .unwrap()
        }
    };
    let resolver = resolver(dns, false, false);
    let _a = publish("10.7.0.1:80", live_addr).await;
    let b = publish("10.7.0.2:80", live_addr).await;
    let _c = publish("10.7.0.3:80", dead_addr).await;
    // One of three failing its check is left out.
    answered(&resolver, "checked.roster.", &["10.7.0.1", "10.7.0.2"]).await;
    // One of two is not past the threshold (a half): still left out.
    b.unpublish().await.unwrap();
    answered(&resolver, "checked.roster.", &["10.7.0.1"]).await;
    // Two of three are: every instance is answered rather than the one left.
    let _d = publish("10.7.0.4:80", dead_addr).await;
    answered(
        &resolver,
        "checked.roster.",
        &["10.7.0.1", "10.7.0.3", "10.7.0.4"],
    )
    .await;
    accepting.abort();
    drop(client);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_names_cannot_hold_the_watched_services() {
    let cluster = Cluster::start_with(ClusterOptions {
        dns: true,
        session: |c| {
            c.dns.max_services = 2;
            c.dns.idle = Duration::from_secs(60);
            c.dns.unknown_idle = Duration::from_millis(300);
        },
        ..Default::default()
    })
    .await;
    let dns = cluster.dns_addrs[0];
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let _real = client
        .publish("real", vec!["10.8.0.1:80".into()])
        .await
        .unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |id: u16, name: &'static str| {
        let socket = &socket;
        async move { ask_udp(socket, dns, &query(id, name, RecordType::A, false), id).await }
    };
    assert_eq!(ask(1, "real.roster.").await.answers.len(), 1);
    assert_eq!(
        ask(2, "made-up-1.roster.").await.metadata.response_code,
        ResponseCode::NXDomain
    );
    // Two watched: a third name is refused service for now.
    assert_eq!(
        ask(3, "made-up-2.roster.").await.metadata.response_code,
        ResponseCode::ServFail
    );
    // The made-up name goes soon; the real service, asked no more often, stays.
    eventually(DEADLINE, "the made-up name dropped", || async {
        (watched(&cluster).await == ["default/DEFAULT/real"]).then_some(())
    })
    .await;
    assert_eq!(
        ask(4, "made-up-2.roster.").await.metadata.response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(ask(5, "real.roster.").await.answers.len(), 1);
    drop(client);
    cluster.stop().await;
}
