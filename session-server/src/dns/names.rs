//! DNS names and the services they stand for.
//!
//! Within the zone (`--dns-domain`, `roster.` unless set):
//!
//! - `NAME.ZONE` is the service `default/DEFAULT/NAME`;
//! - `NAME.GROUP.NAMESPACE.ZONE` is `NAMESPACE/GROUP/NAME`, where the group `DEFAULT` is written
//!   `default`;
//! - `HEX.addr.ZONE` is an IP address written in hexadecimal (8 digits for IPv4, 32 for IPv6):
//!   the target of an SRV record whose instance gave an IP, so the answer's additional section
//!   can carry its address.
//!
//! DNS names are case-insensitive, so names are matched in lowercase: a service is reachable by
//! DNS when its namespace and name, and its group unless it is `DEFAULT`, are lowercase DNS
//! labels — 1 to 63 of `a-z`, `0-9`, `-` and `_`. Any other service (`com.example.Api`, a name
//! with upper case) is not reachable by DNS; it is never rewritten into some other name that
//! might belong to another service.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_server::proto::rr::{LowerName, Name};
use roster_common::ids::{DEFAULT_GROUP, DEFAULT_NAMESPACE};
use roster_common::{Error, Result, ServiceId};

/// The label under which SRV targets' addresses live.
const ADDR_LABEL: &[u8] = b"addr";
/// How the group `DEFAULT` is written in a name.
const DEFAULT_GROUP_LABEL: &str = "default";

/// What a name within the zone stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The zone itself.
    Apex,
    Service(ServiceId),
    /// `HEX.addr.ZONE`.
    Addr(IpAddr),
    /// Within the zone, but nothing Roster could have.
    Nothing,
}

/// The zone DNS answers for.
#[derive(Clone, Debug)]
pub struct Zone {
    name: Name,
    lower: LowerName,
}

impl Zone {
    /// The zone `domain` (`roster.`; the final dot may be left out).
    pub fn new(domain: &str) -> Result<Zone> {
        let refuse = |why: &str| {
            Error::InvalidArgument(format!(
                "--dns-domain {domain:?}: {why} (expected a domain such as `roster.` or \
                 `roster.svc.example.`)"
            ))
        };
        let mut name = Name::from_ascii(domain).map_err(|e| refuse(&e.to_string()))?;
        name.set_fqdn(true);
        if name.is_root() {
            return Err(refuse("the root zone would take every name"));
        }
        if name.iter().any(|label| !is_label(label)) {
            return Err(refuse("each label must be letters, digits, `-` or `_`"));
        }
        let name = name.to_lowercase();
        Ok(Zone {
            lower: LowerName::new(&name),
            name,
        })
    }

    /// The zone's name, lowercase and fully qualified.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// What `name` stands for; `None` when it is outside the zone.
    pub fn target(&self, name: &LowerName) -> Option<Target> {
        if !self.lower.zone_of(name) {
            return None;
        }
        let inside = usize::from(name.num_labels() - self.name.num_labels());
        let labels: Vec<&[u8]> = name.iter().take(inside).collect();
        Some(match labels[..] {
            [] => Target::Apex,
            [hex, ADDR_LABEL] => decode_addr(hex).map_or(Target::Nothing, Target::Addr),
            [name] => service(
                DEFAULT_NAMESPACE.as_bytes(),
                DEFAULT_GROUP_LABEL.as_bytes(),
                name,
            ),
            [name, group, namespace] => service(namespace, group, name),
            _ => Target::Nothing,
        })
    }

    /// The name of `service` in this zone, or why DNS cannot reach it.
    pub fn service_name(&self, service: &ServiceId) -> std::result::Result<Name, Unreachable> {
        let group = match service.group() {
            DEFAULT_GROUP => DEFAULT_GROUP_LABEL,
            DEFAULT_GROUP_LABEL => return Err(Unreachable(service.clone())),
            group => group,
        };
        let parts = [service.data_id(), group, service.namespace()];
        if parts.iter().any(|p| !is_service_label(p)) {
            return Err(Unreachable(service.clone()));
        }
        let short = service.namespace() == DEFAULT_NAMESPACE && group == DEFAULT_GROUP_LABEL;
        let labels = if short { &parts[..1] } else { &parts[..] };
        Name::from_labels(labels.iter().map(|l| l.as_bytes()))
            .and_then(|n| n.append_domain(&self.name))
            .map_err(|_| Unreachable(service.clone()))
    }

    /// The name standing for `ip`, an SRV target.
    pub fn addr_name(&self, ip: IpAddr) -> Name {
        let hex = match ip {
            IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
            IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
        };
        Name::from_labels([hex.as_bytes(), ADDR_LABEL])
            .and_then(|n| n.append_domain(&self.name))
            .expect("hex digits and `addr` are valid labels")
    }
}

/// A service whose id is not made of DNS labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable(pub ServiceId);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {} is not reachable by DNS: its namespace, group and name must be lowercase \
             DNS labels (a-z, 0-9, `-`, `_`, at most 63 characters)",
            self.0
        )
    }
}

/// The service `namespace/group/name`, if each is a lowercase service label (as the query gave
/// them: the resolver may have changed their case, so they are lowercased here).
fn service(namespace: &[u8], group: &[u8], name: &[u8]) -> Target {
    let part = |label: &[u8]| {
        std::str::from_utf8(label)
            .ok()
            .map(str::to_ascii_lowercase)
            .filter(|p| is_service_label(p))
    };
    let (Some(namespace), Some(group), Some(name)) = (part(namespace), part(group), part(name))
    else {
        return Target::Nothing;
    };
    let group = if group == DEFAULT_GROUP_LABEL {
        DEFAULT_GROUP
    } else {
        &group
    };
    ServiceId::new(&namespace, group, &name).map_or(Target::Nothing, Target::Service)
}

/// A lowercase label a service's parts may be.
fn is_service_label(part: &str) -> bool {
    (1..=63).contains(&part.len())
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn is_label(label: &[u8]) -> bool {
    label
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

fn decode_addr(hex: &[u8]) -> Option<IpAddr> {
    let hex = std::str::from_utf8(hex).ok()?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => Some(Ipv4Addr::from(u32::from_str_radix(hex, 16).ok()?).into()),
        32 => Some(Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?).into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(name: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(name).unwrap())
    }

    fn target(zone: &Zone, name: &str) -> Option<Target> {
        zone.target(&lower(name))
    }

    fn svc(id: &str) -> Target {
        Target::Service(id.parse().unwrap())
    }

    #[test]
    fn names_map_to_services_case_insensitively() {
        let zone = Zone::new("roster").unwrap();
        assert_eq!(zone.name().to_ascii(), "roster.");
        assert_eq!(
            target(&zone, "web.roster."),
            Some(svc("default/DEFAULT/web"))
        );
        assert_eq!(
            target(&zone, "WeB.RoStEr."),
            Some(svc("default/DEFAULT/web"))
        );
        assert_eq!(
            target(&zone, "api.blue.prod.roster."),
            Some(svc("prod/blue/api"))
        );
        assert_eq!(
            target(&zone, "api.DEFAULT.prod.roster."),
            Some(svc("prod/DEFAULT/api"))
        );
        assert_eq!(target(&zone, "roster."), Some(Target::Apex));
        assert_eq!(target(&zone, "a.b.roster."), Some(Target::Nothing));
        assert_eq!(target(&zone, "a.b.c.d.roster."), Some(Target::Nothing));
        assert_eq!(target(&zone, "web.example."), None);
        assert_eq!(target(&zone, "roster.example."), None);
        assert_eq!(target(&zone, "."), None);
    }

    #[test]
    fn every_reachable_service_name_leads_back_to_its_service() {
        let zone = Zone::new("svc.example.").unwrap();
        for id in [
            "default/DEFAULT/web",
            "prod/DEFAULT/api",
            "prod/blue/api_v2",
            "default/canary/web-1",
        ] {
            let service: ServiceId = id.parse().unwrap();
            let name = zone.service_name(&service).unwrap();
            assert_eq!(
                target(&zone, &name.to_ascii()),
                Some(Target::Service(service)),
                "{name}"
            );
        }
        assert_eq!(
            zone.service_name(&"web".parse().unwrap())
                .unwrap()
                .to_ascii(),
            "web.svc.example."
        );
    }

    #[test]
    fn services_that_are_not_dns_labels_are_unreachable_not_mangled() {
        let zone = Zone::new("roster.").unwrap();
        for id in [
            "default/DEFAULT/com.example.Api",
            "default/DEFAULT/Web",
            "Prod/DEFAULT/web",
            "prod/Blue/web",
            "prod/default/web",
            "default/DEFAULT/has space",
        ] {
            let service: ServiceId = id.parse().unwrap();
            let refused = zone.service_name(&service).unwrap_err();
            assert!(refused.to_string().contains("not reachable by DNS"), "{id}");
        }
    }

    #[test]
    fn addr_names_round_trip() {
        let zone = Zone::new("roster.").unwrap();
        for ip in ["10.0.0.1", "127.0.0.1", "::1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = zone.addr_name(ip);
            assert_eq!(target(&zone, &name.to_ascii()), Some(Target::Addr(ip)));
        }
        assert_eq!(
            zone.addr_name("10.0.0.1".parse().unwrap()).to_ascii(),
            "0a000001.addr.roster."
        );
        for bad in ["0a0001.addr.roster.", "zz000001.addr.roster."] {
            assert_eq!(target(&zone, bad), Some(Target::Nothing), "{bad}");
        }
    }

    #[test]
    fn a_zone_must_be_a_domain() {
        for bad in [".", "", "bad domain.", "a..b"] {
            assert!(Zone::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Zone::new("Roster.Example").unwrap().name().to_ascii(),
            "roster.example."
        );
    }
}
