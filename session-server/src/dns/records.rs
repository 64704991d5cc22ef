//! A service's instances as DNS records.
//!
//! Each data item of a publisher that reads `HOST:PORT` is an endpoint — also when written as a
//! URL (`bolt://10.0.0.7:12200?timeout=3000`: the scheme, and the path or query after the port,
//! are ignored). `HOST` is an IPv4 address, an IPv6 address in brackets (`[2001:db8::7]:80`), or
//! a host name. Other data items are not endpoints and DNS leaves them out.
//!
//! - `SRV`: one per endpoint, priority 0, weight 1, its port, and as target the host name, or for
//!   an IP the name `HEX.addr.ZONE` whose `A`/`AAAA` record the additional section carries.
//! - `A` / `AAAA`: every IPv4 / IPv6 address of the service's endpoints, once each. Host names
//!   appear only as SRV targets (Roster does not resolve them).
//! - `TXT`: one per instance: `id=REGISTER_ID`, `endpoint=HOST:PORT` for each of its endpoints
//!   (as its data item gives it), then each attribute as `key=value`: which attributes go with
//!   which endpoint. A string over 255 bytes, the most a TXT string holds, is left out.
//!
//! Only healthy instances are answered where health is known, with the protection threshold
//! healthy-only subscribers have (`roster_common::health::healthy_view`): past it every instance
//! is answered.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use hickory_server::proto::rr::rdata::{A, AAAA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use parking_lot::Mutex;
use roster_common::health::healthy_view;
use roster_common::proto::PublisherView;
use roster_common::{Version, frame};

use super::names::Zone;

/// Longest TXT character string.
const MAX_TXT_STRING: usize = 255;

/// Where an endpoint is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    Ip(IpAddr),
    Name(Name),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

/// Answers kept per version, by name and type asked: a service is usually asked for under one
/// name and a few types.
const ANSWERS_KEPT: usize = 8;

/// The instances of one service at one version that DNS answers with.
#[derive(Debug, Default)]
pub struct Instances {
    pub version: Version,
    /// Every endpoint of the instances answered, once each, sorted.
    endpoints: Vec<Endpoint>,
    /// Each instance's TXT strings.
    txt: Vec<Vec<String>>,
    /// The answers built so far (at most [`ANSWERS_KEPT`]), by name and type asked.
    answers: Mutex<Vec<(Name, RecordType, Arc<Answer>)>>,
}

/// The records answering one query.
#[derive(Debug, Default)]
pub struct Answer {
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Instances {
    /// The instances among `encoded` (publishers as the hub keeps them) that DNS answers with.
    pub fn new(version: Version, encoded: &[Bytes], protection_threshold: f64) -> Instances {
        // The hub encoded them; one that does not decode (never expected) is left out.
        let publishers: Vec<PublisherView> = encoded
            .iter()
            .filter_map(|bytes| frame::decode(bytes).ok())
            .collect();
        let health = publishers.iter().map(|p| p.health.as_ref());
        let (_, shown) = healthy_view(health, protection_threshold);
        let mut endpoints = BTreeSet::new();
        let mut txt = Vec::with_capacity(shown.len());
        for publisher in shown.into_iter().map(|i| &publishers[i]) {
            endpoints.extend(publisher.data.iter().filter_map(|d| endpoint(d)));
            txt.push(txt_strings(publisher));
        }
        Instances {
            version,
            endpoints: endpoints.into_iter().collect(),
            txt,
            answers: Mutex::new(Vec::new()),
        }
    }

    /// How many instances are answered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.txt.len()
    }

    /// The records answering a `qtype` query for `owner`, the service's name; built once per
    /// name and type.
    pub fn answer(&self, owner: &Name, qtype: RecordType, zone: &Zone, ttl: u32) -> Arc<Answer> {
        let kept = self.answers.lock();
        if let Some((_, _, answer)) = kept.iter().find(|(n, t, _)| *t == qtype && n == owner) {
            return answer.clone();
        }
        drop(kept);
        let answer = Arc::new(self.build(owner, qtype, zone, ttl));
        let mut kept = self.answers.lock();
        if kept.len() < ANSWERS_KEPT {
            kept.push((owner.clone(), qtype, answer.clone()));
        }
        answer
    }

    fn build(&self, owner: &Name, qtype: RecordType, zone: &Zone, ttl: u32) -> Answer {
        let record = |name: &Name, rdata: RData| Record::from_rdata(name.clone(), ttl, rdata);
        let mut answer = Answer::default();
        match qtype {
            RecordType::SRV | RecordType::ANY => {
                let mut addrs = BTreeSet::new();
                for e in &self.endpoints {
                    let target = match &e.host {
                        Host::Ip(ip) => {
                            addrs.insert(*ip);
                            zone.addr_name(*ip)
                        }
                        Host::Name(name) => name.clone(),
                    };
                    answer
                        .answers
                        .push(record(owner, RData::SRV(SRV::new(0, 1, e.port, target))));
                }
                answer.additionals = addrs
                    .into_iter()
                    .map(|ip| record(&zone.addr_name(ip), ip_rdata(ip)))
                    .collect();
            }
            RecordType::A | RecordType::AAAA => {
                let ips: BTreeSet<IpAddr> = self
                    .endpoints
                    .iter()
                    .filter_map(|e| match e.host {
                        Host::Ip(ip) if ip.is_ipv4() == (qtype == RecordType::A) => Some(ip),
                        _ => None,
                    })
                    .collect();
                answer.answers = ips
                    .into_iter()
                    .map(|ip| record(owner, ip_rdata(ip)))
                    .collect();
            }
            RecordType::TXT => {
                answer.answers = self
                    .txt
                    .iter()
                    .map(|strings| record(owner, RData::TXT(TXT::new(strings.clone()))))
                    .collect();
            }
            _ => {}
        }
        answer
    }
}

/// The `A` or `AAAA` data of `ip`.
pub fn ip_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// The endpoint a data item names, if it reads `HOST:PORT` (see the module's documentation).
pub fn endpoint(item: &[u8]) -> Option<Endpoint> {
    let text = std::str::from_utf8(item).ok()?.trim();
    let text = text.split_once("://").map_or(text, |(_, rest)| rest);
    let text = text.split(['/', '?', '#']).next()?;
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Host::Ip(IpAddr::V6(v6.parse().ok()?))
    } else if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        Host::Ip(IpAddr::V4(ip))
    } else {
        // A host name: labels of letters, digits and `-` (a bare IPv6 address, ambiguous with
        // its port, is not one).
        let valid = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return None;
        }
        let mut name = Name::from_ascii(host).ok()?.to_lowercase();
        name.set_fqdn(true);
        Host::Name(name)
    };
    Some(Endpoint { host, port })
}

fn txt_strings(publisher: &PublisherView) -> Vec<String> {
    let endpoints = publisher
        .data
        .iter()
        .filter(|d| endpoint(d).is_some())
        .map(|d| format!("endpoint={}", String::from_utf8_lossy(d).trim()));
    std::iter::once(format!("id={}", publisher.register_id))
        .chain(endpoints)
        .chain(publisher.attributes.iter().map(|(k, v)| format!("{k}={v}")))
        .filter(|s| s.len() <= MAX_TXT_STRING)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use roster_common::health::Health;
    use roster_common::push::encode_publisher;

    use super::*;

    fn publisher(id: &str, data: &[&str], healthy: Option<bool>) -> Bytes {
        encode_publisher(&PublisherView {
            client_id: "c".into(),
            register_id: id.into(),
            data: data.iter().map(|d| Bytes::from(d.to_string())).collect(),
            attributes: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            client_version: 1,
            persistent: false,
            health: healthy.map(|healthy| Health {
                healthy,
                checked_ms: 1,
                failure: None,
            }),
        })
    }

    fn endpoint_of(item: &str) -> Option<String> {
        endpoint(item.as_bytes()).map(|e| match e.host {
            Host::Ip(ip) => format!("{ip} {}", e.port),
            Host::Name(name) => format!("{name} {}", e.port),
        })
    }

    #[test]
    fn data_items_are_read_as_endpoints() {
        let cases = [
            ("10.0.0.7:8080", Some("10.0.0.7 8080")),
            ("[2001:db8::7]:80", Some("2001:db8::7 80")),
            ("Api.Example.com:443", Some("api.example.com. 443")),
            ("bolt://10.0.0.7:12200?timeout=3000", Some("10.0.0.7 12200")),
            ("http://web-1:8080/health", Some("web-1. 8080")),
            ("10.0.0.7", None),
            ("10.0.0.7:0", None),
            ("10.0.0.7:70000", None),
            ("2001:db8::7:80", None),
            ("bad host:80", None),
            ("a..b:80", None),
            ("{\"weight\": 3}", None),
        ];
        for (item, expected) in cases {
            assert_eq!(endpoint_of(item).as_deref(), expected, "{item}");
        }
        assert_eq!(endpoint(b"\xff\xfe:80"), None);
    }

    #[test]
    fn srv_answers_carry_the_addresses_of_their_targets() {
        let zone = Zone::new("roster.").unwrap();
        let owner = Name::from_ascii("web.roster.").unwrap();
        let encoded = [
            publisher("a", &["10.0.0.1:80", "10.0.0.1:81"], None),
            publisher("b", &["[::1]:80", "note"], None),
            publisher("c", &["db.example:5432", "10.0.0.1:80"], None),
        ];
        let instances = Instances::new(7, &encoded, 0.5);
        assert_eq!(instances.len(), 3);
        let srv = instances.answer(&owner, RecordType::SRV, &zone, 5);
        let shown: Vec<String> = srv.answers.iter().map(|r| r.to_string()).collect();
        assert_eq!(srv.answers.len(), 4, "{shown:?}");
        assert!(srv.answers.iter().all(|r| r.ttl == 5 && r.name == owner));
        let additional: Vec<String> = srv
            .additionals
            .iter()
            .map(|r| format!("{} {}", r.name, r.data))
            .collect();
        assert_eq!(
            additional,
            [
                "0a000001.addr.roster. 10.0.0.1",
                "00000000000000000000000000000001.addr.roster. ::1"
            ]
        );
        assert!(shown.iter().any(|s| s.contains("0 1 5432 db.example.")));

        let a = instances.answer(&owner, RecordType::A, &zone, 5);
        assert_eq!(a.answers.len(), 1, "one address, however many ports");
        let aaaa = instances.answer(&owner, RecordType::AAAA, &zone, 5);
        assert_eq!(aaaa.answers[0].data.to_string(), "::1");
        let txt = instances.answer(&owner, RecordType::TXT, &zone, 5);
        let txt: Vec<String> = txt.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(txt.len(), 3);
        assert!(
            txt[0].contains("id=a") && txt[0].contains("zone=a"),
            "{txt:?}"
        );
        assert!(
            Arc::ptr_eq(&srv, &instances.answer(&owner, RecordType::SRV, &zone, 5)),
            "built once"
        );
        let mx = instances.answer(&owner, RecordType::MX, &zone, 5);
        assert!(mx.answers.is_empty() && mx.additionals.is_empty());
    }

    #[test]
    fn unhealthy_instances_are_left_out_until_the_protection_applies() {
        let zone = Zone::new("roster.").unwrap();
        let owner = Name::from_ascii("web.roster.").unwrap();
        let count = |encoded: &[Bytes]| {
            let instances = Instances::new(1, encoded, 0.5);
            instances
                .answer(&owner, RecordType::A, &zone, 5)
                .answers
                .len()
        };
        let up = |i: u8| publisher(&format!("{i}"), &[&format!("10.0.0.{i}:80")], Some(true));
        let down = |i: u8| publisher(&format!("{i}"), &[&format!("10.0.0.{i}:80")], Some(false));
        let unchecked = |i: u8| publisher(&format!("{i}"), &[&format!("10.0.0.{i}:80")], None);
        assert_eq!(count(&[up(1), down(2), unchecked(3)]), 2);
        // Three of four unhealthy is past half: all four are answered.
        assert_eq!(count(&[up(1), down(2), down(3), down(4)]), 4);
        assert_eq!(count(&[]), 0);
    }

    #[test]
    fn attributes_too_long_for_a_txt_string_are_left_out() {
        let mut view = PublisherView {
            client_id: "c".into(),
            register_id: "r".into(),
            data: vec![],
            attributes: BTreeMap::new(),
            client_version: 1,
            persistent: false,
            health: None,
        };
        view.attributes.insert("long".into(), "x".repeat(300));
        view.attributes.insert("short".into(), "y".into());
        view.data = vec![Bytes::from("10.0.0.1:80")];
        assert_eq!(
            txt_strings(&view),
            ["id=r", "endpoint=10.0.0.1:80", "short=y"]
        );
    }
}
