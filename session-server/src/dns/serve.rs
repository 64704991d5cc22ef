//! Serving DNS: the UDP loop, the TCP listener, and how a query becomes an answer.
//!
//! A query whose answer is in memory is answered inside the UDP loop, with no task spawned; one
//! that has to wait for a first snapshot gets a task of its own (at most [`MAX_WAITING`] at
//! once). Over TCP each connection is served by one task, a query at a time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::SOA;
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use parking_lot::Mutex;
use roster_common::ServiceId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::cache::{Cache, Found};
use super::limit::Limiter;
use super::names::{Target, Zone};
use super::records::{Answer, ip_rdata};
use super::{DnsConfig, MAX_TCP_CONNECTIONS, MAX_WAITING, TCP_IDLE};
use crate::shared::Shared;

/// The largest UDP query read, and the EDNS buffer size this server announces.
const UDP_BUFFER: usize = 4096;
/// The most a UDP answer may take, whatever the client announces.
const MAX_UDP_ANSWER: u16 = 4096;

/// One DNS server: the zone, what it answers from, and its limits.
struct Dns {
    zone: Zone,
    ttl: u32,
    soa: Record,
    cache: Cache,
    limiter: Mutex<Limiter>,
    waiting: Arc<Semaphore>,
}

/// What to do with a packet.
enum Step {
    Reply(Vec<u8>),
    Drop,
    /// The answer needs a service's first snapshot.
    Wait(Box<Pending>),
}

struct Pending {
    request: Request,
    service: ServiceId,
    started: Instant,
}

/// Why a packet was dropped: `roster_dns_dropped_total{reason}`.
fn dropped(reason: &'static str) {
    metrics::counter!("roster_dns_dropped_total", "reason" => reason).increment(1);
}

impl Dns {
    fn new(shared: Arc<Shared>, config: &DnsConfig) -> Dns {
        let zone = Zone::new(&config.domain).expect("the domain was validated");
        let soa = soa(zone.name(), config.ttl_secs);
        Dns {
            zone,
            ttl: config.ttl_secs,
            soa,
            cache: Cache::new(shared, config.max_services),
            limiter: Mutex::new(Limiter::new(config.qps_per_source)),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
        }
    }

    fn allow(&self, source: IpAddr, now: Instant) -> bool {
        let allowed = self.limiter.lock().allow(source, now);
        if !allowed {
            dropped("rate_limited");
        }
        allowed
    }

    /// Reads a packet and answers it, or says why not yet.
    fn step(&self, raw: Vec<u8>, src: SocketAddr, protocol: Protocol, started: Instant) -> Step {
        let request = match Request::from_bytes(raw, src, protocol) {
            Ok(request) if request.metadata.message_type == MessageType::Query => request,
            Ok(_) | Err(_) => {
                debug!(%src, "dropped a packet that is not a DNS query");
                dropped("malformed");
                return Step::Drop;
            }
        };
        if request.metadata.op_code != OpCode::Query {
            return Step::Reply(self.reply(&request, Reply::code(ResponseCode::NotImp), started));
        }
        let [query] = request.queries.queries() else {
            return Step::Reply(self.reply(&request, Reply::code(ResponseCode::FormErr), started));
        };
        let qtype = query.query_type();
        let owner = Name::from(query.name().clone());
        // The zone holds Internet-class records only (`CH TXT version.bind.` and the like are
        // refused, as names outside the zone are).
        let in_class = matches!(query.query_class(), DNSClass::IN | DNSClass::ANY);
        let target = self.zone.target(query.name()).filter(|_| in_class);
        let reply = match target {
            None => Reply {
                authoritative: false,
                ..Reply::code(ResponseCode::Refused)
            },
            Some(Target::Nothing) => Reply::negative(ResponseCode::NXDomain),
            Some(Target::Apex) if matches!(qtype, RecordType::SOA | RecordType::ANY) => {
                Reply::records(Arc::new(Answer {
                    answers: vec![self.soa.clone()],
                    additionals: Vec::new(),
                }))
            }
            Some(Target::Apex) => Reply::negative(ResponseCode::NoError),
            Some(Target::Addr(ip)) => {
                let family = if ip.is_ipv4() {
                    RecordType::A
                } else {
                    RecordType::AAAA
                };
                if qtype == family || qtype == RecordType::ANY {
                    Reply::records(Arc::new(Answer {
                        answers: vec![Record::from_rdata(owner, self.ttl, ip_rdata(ip))],
                        additionals: Vec::new(),
                    }))
                } else {
                    Reply::negative(ResponseCode::NoError)
                }
            }
            Some(Target::Service(service)) => match self.cache.get(&service, started) {
                Some(found) => self.found(found, &owner, qtype),
                None => {
                    return Step::Wait(Box::new(Pending {
                        request,
                        service,
                        started,
                    }));
                }
            },
        };
        Step::Reply(self.reply(&request, reply, started))
    }

    /// Answers a query that waited for its service's first snapshot.
    async fn finish(&self, pending: Box<Pending>) -> Vec<u8> {
        let Pending {
            request,
            service,
            started,
        } = *pending;
        let reply = match self.cache.resolve(&service).await {
            Ok(found) => {
                let query = &request.queries.queries()[0];
                let owner = Name::from(query.name().clone());
                self.found(found, &owner, query.query_type())
            }
            Err(why) => {
                debug!(%service, ?why, "no answer for a DNS query");
                Reply::code(ResponseCode::ServFail)
            }
        };
        metrics::gauge!("roster_dns_watched_services").set(self.cache.len() as f64);
        self.reply(&request, reply, started)
    }

    fn found(&self, found: Found, owner: &Name, qtype: RecordType) -> Reply {
        match found {
            Found::Unknown => Reply::negative(ResponseCode::NXDomain),
            Found::Instances(instances) => {
                let answer = instances.answer(owner, qtype, &self.zone, self.ttl);
                if answer.answers.is_empty() {
                    Reply::negative(ResponseCode::NoError)
                } else {
                    Reply::records(answer)
                }
            }
        }
    }

    /// The answer's bytes, fitted to the client's buffer over UDP. Counts the query.
    fn reply(&self, request: &Request, reply: Reply, started: Instant) -> Vec<u8> {
        let udp = request.protocol() == Protocol::Udp;
        let limit = if udp {
            request.max_payload().min(MAX_UDP_ANSWER)
        } else {
            u16::MAX
        };
        let mut bytes = self.encode(request, &reply, true, limit);
        if matches!(bytes, Some((_, true))) && !reply.answer.additionals.is_empty() {
            // The additional section is a courtesy: leave it out rather than send the client to
            // TCP for it (RFC 2181, 9).
            bytes = self.encode(request, &reply, false, limit);
        }
        let bytes = match bytes {
            Some((bytes, truncated)) => {
                if truncated {
                    metrics::counter!("roster_dns_truncated_total").increment(1);
                }
                bytes
            }
            None => {
                let failed = Reply::code(ResponseCode::ServFail);
                self.encode(request, &failed, false, limit)
                    .map(|(bytes, _)| bytes)
                    .unwrap_or_default()
            }
        };
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("none", |q| qtype_label(q.query_type()));
        let code = if bytes.is_empty() {
            ResponseCode::ServFail
        } else {
            reply.code
        };
        metrics::counter!("roster_dns_queries_total", "qtype" => qtype, "rcode" => rcode_label(code))
            .increment(1);
        metrics::histogram!("roster_dns_query_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        bytes
    }

    /// Encodes `reply` within `limit` bytes: the bytes and whether they were truncated, or
    /// `None` when it cannot be encoded at all.
    fn encode(
        &self,
        request: &Request,
        reply: &Reply,
        additionals: bool,
        limit: u16,
    ) -> Option<(Vec<u8>, bool)> {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = false;
        metadata.response_code = reply.code;
        let edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_BUFFER as u16);
            edns
        });
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            reply.answer.answers.iter(),
            std::iter::empty(),
            reply.soa.then_some(&self.soa),
            if additionals {
                &reply.answer.additionals[..]
            } else {
                &[]
            },
        );
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        match response.destructive_emit(&mut encoder) {
            Ok(info) => Some((bytes, info.truncation)),
            Err(error) => {
                warn!(%error, "cannot encode a DNS answer");
                None
            }
        }
    }
}

/// What to answer, before it is encoded.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answer: Arc<Answer>,
    /// Carry the zone's SOA in the authority section (negative answers).
    soa: bool,
}

impl Reply {
    fn code(code: ResponseCode) -> Reply {
        Reply {
            code,
            authoritative: true,
            answer: Arc::default(),
            soa: false,
        }
    }

    /// No records: `NXDOMAIN`, or `NOERROR` for a name with none of the type asked.
    fn negative(code: ResponseCode) -> Reply {
        Reply {
            soa: true,
            ..Reply::code(code)
        }
    }

    fn records(answer: Arc<Answer>) -> Reply {
        Reply {
            answer,
            ..Reply::code(ResponseCode::NoError)
        }
    }
}

/// The zone's SOA. Its minimum, which bounds how long resolvers cache a negative answer, is the
/// TTL.
fn soa(zone: &Name, ttl: u32) -> Record {
    let name = |label: &str| {
        Name::from_ascii(label)
            .and_then(|n| n.append_domain(zone))
            .expect("a valid label under a valid zone")
    };
    let ttl_i32 = i32::try_from(ttl).unwrap_or(i32::MAX);
    let data = SOA::new(
        name("ns"),
        name("hostmaster"),
        1,
        ttl_i32.max(60),
        ttl_i32.max(60),
        86_400,
        ttl,
    );
    Record::from_rdata(zone.clone(), ttl, RData::SOA(data))
}

fn qtype_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::TXT => "TXT",
        RecordType::ANY => "ANY",
        RecordType::SOA => "SOA",
        _ => "other",
    }
}

fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        _ => "other",
    }
}

/// Serves DNS on `udp` and `tcp` until `stop`.
pub(super) async fn run(
    shared: Arc<Shared>,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    stop: CancellationToken,
) {
    let config = shared.config().dns.clone();
    let (udp, tcp) = match (UdpSocket::from_std(udp), TcpListener::from_std(tcp)) {
        (Ok(udp), Ok(tcp)) => (Arc::new(udp), tcp),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot serve DNS");
            return;
        }
    };
    let addr = udp.local_addr().ok();
    let dns = Arc::new(Dns::new(shared, &config));
    info!(addr = ?addr, domain = %dns.zone.name(), ttl = config.ttl_secs, "serving DNS over UDP and TCP");
    warn!(
        "DNS answers are not authenticated: whoever reaches the DNS port can read the endpoints of \
         every service whose name is a DNS name"
    );
    let tracker = TaskTracker::new();
    tracker.spawn(udp_loop(dns.clone(), udp, tracker.clone(), stop.clone()));
    tracker.spawn(tcp_loop(dns.clone(), tcp, tracker.clone(), stop.clone()));
    let unknown_idle = config.unknown_idle.min(config.idle);
    tracker.spawn(sweep(dns, config.idle, unknown_idle, stop.clone()));
    tracker.close();
    tracker.wait().await;
}

async fn udp_loop(
    dns: Arc<Dns>,
    socket: Arc<UdpSocket>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let (len, src) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
        };
        let started = Instant::now();
        if !dns.allow(src.ip(), started) {
            continue;
        }
        let bytes = match dns.step(buf[..len].to_vec(), src, Protocol::Udp, started) {
            Step::Reply(bytes) => bytes,
            Step::Drop => continue,
            Step::Wait(pending) => {
                let Ok(permit) = dns.waiting.clone().try_acquire_owned() else {
                    dropped("busy");
                    continue;
                };
                let (dns, socket) = (dns.clone(), socket.clone());
                let stop = stop.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        bytes = dns.finish(pending) => {
                            let _ = socket.send_to(&bytes, src).await;
                        }
                    }
                    drop(permit);
                });
                continue;
            }
        };
        if let Err(e) = socket.send_to(&bytes, src).await {
            debug!(%src, error = %e, "cannot send a DNS answer");
        }
    }
}

async fn tcp_loop(
    dns: Arc<Dns>,
    listener: TcpListener,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, src) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: give it a moment rather than spin.
                    warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            dropped("busy");
            continue;
        };
        let dns = dns.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = serve_tcp(&dns, stream, src) => {}
            }
            drop(permit);
        });
    }
}

/// Answers the queries of one TCP connection, each framed by its length (RFC 1035, 4.2.2).
async fn serve_tcp(dns: &Dns, mut stream: TcpStream, src: SocketAddr) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut raw = vec![0u8; usize::from(len)];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut raw)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let started = Instant::now();
        if !dns.allow(src.ip(), started) {
            continue;
        }
        let bytes = match dns.step(raw, src, Protocol::Tcp, started) {
            Step::Reply(bytes) => bytes,
            Step::Drop => return,
            Step::Wait(pending) => dns.finish(pending).await,
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Drops the services nobody queried for `idle`, and names of no service for `unknown_idle`.
async fn sweep(dns: Arc<Dns>, idle: Duration, unknown_idle: Duration, stop: CancellationToken) {
    let period = (unknown_idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dropped = dns.cache.sweep(Instant::now(), idle, unknown_idle);
        if dropped > 0 {
            debug!(services = dropped, "DNS dropped idle services");
        }
        metrics::gauge!("roster_dns_watched_services").set(dns.cache.len() as f64);
    }
}
