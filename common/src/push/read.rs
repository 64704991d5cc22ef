//! Reading pushes that carry publishers without the general decoder's per-value dispatch.
//!
//! A subscriber decodes every publisher of every push it is sent — in a rollout, each registration
//! once per subscriber — so the cost of reading one is what the client pays per change. The
//! general decoder ([`frame::decode`]) visits each value through serde and matches each field name
//! as it goes; this reader walks the MessagePack of `Snapshot` and `Delta` pushes directly, in
//! the shape servers write them (named fields, in any order, optional ones left out).
//!
//! It never decides alone what a frame means: anything it does not read exactly — another kind of
//! push, a field it does not know, a duplicate, a value of an unusual type, a malformed or
//! truncated frame, trailing bytes — is handed to [`frame::decode`], so the result (value or
//! error) is always the general decoder's. The tests hold the two to that.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::Result;
use crate::frame;
use crate::health::Health;
use crate::proto::{Delta, PublisherId, PublisherView, Push, Snapshot};

/// Decodes one push frame body, as `frame::decode::<Push>` does, faster for the pushes that carry
/// publishers.
pub fn decode(body: &[u8]) -> Result<Push> {
    match read(body) {
        Some(push) => Ok(push),
        None => frame::decode(body),
    }
}

/// The push in `body` if it is a `Snapshot` or `Delta` read exactly; `None` for anything else.
fn read(body: &[u8]) -> Option<Push> {
    let mut r = Reader(body);
    if r.map_len()? != 1 {
        return None;
    }
    let push = match r.str()? {
        "Delta" => Push::Delta(delta(&mut r)?),
        "Snapshot" => Push::Snapshot(snapshot(&mut r)?),
        _ => return None,
    };
    r.0.is_empty().then_some(push)
}

fn delta(r: &mut Reader<'_>) -> Option<Delta> {
    let (mut service, mut base, mut version, mut put, mut removed) = (None, None, None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "service" => once(&mut service, r.str()?.parse().ok()?)?,
            "base" => once(&mut base, r.uint()?)?,
            "version" => once(&mut version, r.uint()?)?,
            "put" => once(&mut put, publishers(r)?)?,
            "removed" => once(&mut removed, removed_ids(r)?)?,
            _ => return None,
        }
    }
    Some(Delta {
        service: service?,
        base: base?,
        version: version?,
        put: put.unwrap_or_default(),
        removed: removed.unwrap_or_default(),
    })
}

fn snapshot(r: &mut Reader<'_>) -> Option<Snapshot> {
    let (mut service, mut version, mut publishers_) = (None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "service" => once(&mut service, r.str()?.parse().ok()?)?,
            "version" => once(&mut version, r.uint()?)?,
            "publishers" => once(&mut publishers_, publishers(r)?)?,
            _ => return None,
        }
    }
    Some(Snapshot {
        service: service?,
        version: version?,
        publishers: publishers_?,
    })
}

fn publishers(r: &mut Reader<'_>) -> Option<Vec<PublisherView>> {
    let n = r.array_len()?;
    // Each takes a byte at least: a length no frame could hold allocates nothing.
    let mut out = Vec::with_capacity(n.min(r.0.len()));
    for _ in 0..n {
        out.push(publisher(r)?);
    }
    Some(out)
}

fn publisher(r: &mut Reader<'_>) -> Option<PublisherView> {
    let (mut client_id, mut register_id, mut data) = (None, None, None);
    let (mut attributes, mut client_version, mut persistent, mut health) = (None, None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "client_id" => once(&mut client_id, r.str()?.to_owned())?,
            "register_id" => once(&mut register_id, r.str()?.to_owned())?,
            "data" => {
                let n = r.array_len()?;
                let mut items = Vec::with_capacity(n.min(r.0.len()));
                for _ in 0..n {
                    items.push(Bytes::copy_from_slice(r.bin()?));
                }
                once(&mut data, items)?
            }
            "attributes" => {
                let mut map = BTreeMap::new();
                for _ in 0..r.map_len()? {
                    map.insert(r.str()?.to_owned(), r.str()?.to_owned());
                }
                once(&mut attributes, map)?
            }
            "client_version" => once(&mut client_version, r.uint()?)?,
            "persistent" => once(&mut persistent, r.bool()?)?,
            "health" => {
                let value = if r.nil() { None } else { Some(health_of(r)?) };
                once(&mut health, value)?
            }
            _ => return None,
        }
    }
    Some(PublisherView {
        client_id: client_id?,
        register_id: register_id?,
        data: data?,
        attributes: attributes.unwrap_or_default(),
        client_version: client_version.unwrap_or_default(),
        persistent: persistent.unwrap_or_default(),
        health: health.flatten(),
    })
}

fn health_of(r: &mut Reader<'_>) -> Option<Health> {
    let (mut healthy, mut checked_ms, mut failure) = (None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "healthy" => once(&mut healthy, r.bool()?)?,
            "checked_ms" => once(&mut checked_ms, r.uint()?)?,
            "failure" => {
                let value = if r.nil() {
                    None
                } else {
                    Some(r.str()?.to_owned())
                };
                once(&mut failure, value)?
            }
            _ => return None,
        }
    }
    Some(Health {
        healthy: healthy?,
        checked_ms: checked_ms.unwrap_or_default(),
        failure: failure.flatten(),
    })
}

fn removed_ids(r: &mut Reader<'_>) -> Option<Vec<PublisherId>> {
    let n = r.array_len()?;
    let mut out = Vec::with_capacity(n.min(r.0.len()));
    for _ in 0..n {
        let (mut client_id, mut register_id) = (None, None);
        for _ in 0..r.map_len()? {
            match r.str()? {
                "client_id" => once(&mut client_id, r.str()?.to_owned())?,
                "register_id" => once(&mut register_id, r.str()?.to_owned())?,
                _ => return None,
            }
        }
        out.push(PublisherId {
            client_id: client_id?,
            register_id: register_id?,
        });
    }
    Some(out)
}

/// Fills a field seen for the first time; a second time is left to the general decoder (which
/// refuses it).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// MessagePack values read off the front of a slice; `None` for anything but the expected kind.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    /// A big-endian unsigned integer of `n` bytes.
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    fn len(&mut self, n: usize) -> Option<usize> {
        usize::try_from(self.be(n)?).ok()
    }

    fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
            0xde => self.len(2),
            0xdf => self.len(4),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
            0xdc => self.len(2),
            0xdd => self.len(4),
            _ => None,
        }
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.len(1)?,
            0xda => self.len(2)?,
            0xdb => self.len(4)?,
            _ => return None,
        };
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let n = match self.byte()? {
            0xc4 => self.len(1)?,
            0xc5 => self.len(2)?,
            0xc6 => self.len(4)?,
            _ => return None,
        };
        self.take(n)
    }

    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> bool {
        if self.0.first() == Some(&0xc0) {
            self.0 = &self.0[1..];
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::{DEFAULT_MAX_FRAME, HEADER_LEN};

    fn arb_view() -> impl Strategy<Value = PublisherView> {
        (
            ("[a-z0-9~]{0,40}", "\\PC{0,40}"),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..3),
            proptest::collection::btree_map("\\PC{0,8}", "\\PC{0,40}", 0..3),
            (any::<u64>(), any::<bool>()),
            proptest::option::of((
                any::<bool>(),
                any::<u64>(),
                proptest::option::of("\\PC{0,300}"),
            )),
        )
            .prop_map(
                |((client_id, register_id), data, attributes, (v, p), health)| PublisherView {
                    client_id,
                    register_id,
                    data: data.into_iter().map(Bytes::from).collect(),
                    attributes,
                    client_version: v,
                    persistent: p,
                    health: health.map(|(healthy, checked_ms, failure)| Health {
                        healthy,
                        checked_ms,
                        failure,
                    }),
                },
            )
    }

    fn arb_push() -> impl Strategy<Value = Push> {
        let service = "[a-z]{1,10}(/[a-z]{1,10}/[a-z]{1,10})?"
            .prop_map(|s| s.parse::<crate::ServiceId>().expect("a valid service id"));
        let ids = proptest::collection::vec(
            ("\\PC{0,40}", "\\PC{0,40}").prop_map(|(client_id, register_id)| PublisherId {
                client_id,
                register_id,
            }),
            0..4,
        );
        prop_oneof![
            (
                service.clone(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(arb_view(), 0..5),
                ids
            )
                .prop_map(|(service, base, version, put, removed)| {
                    Push::Delta(Delta {
                        service,
                        base,
                        version,
                        put,
                        removed,
                    })
                }),
            (
                service,
                any::<u64>(),
                proptest::collection::vec(arb_view(), 0..5)
            )
                .prop_map(|(service, version, publishers)| {
                    Push::Snapshot(Snapshot {
                        service,
                        version,
                        publishers,
                    })
                }),
        ]
    }

    fn body(push: &Push) -> Vec<u8> {
        frame::encode(push, u32::MAX).unwrap()[HEADER_LEN..].to_vec()
    }

    /// Both decoders give the same answer: the same push, or both an error.
    fn agree(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
        match (decode(bytes), frame::decode::<Push>(bytes)) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "this reader says {:?}, the general one {:?}", a, b),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn pushes_as_servers_write_them_are_read_here_and_read_the_same(push in arb_push()) {
            let bytes = body(&push);
            prop_assert_eq!(read(&bytes), Some(push.clone()), "read directly, not handed over");
            // The frames the session assembles from encoded publishers, too.
            if let Push::Delta(d) = &push {
                let put: Vec<Bytes> = d.put.iter().map(crate::push::encode_publisher).collect();
                let removed: Vec<(&str, &str)> = d
                    .removed
                    .iter()
                    .map(|id| (id.client_id.as_str(), id.register_id.as_str()))
                    .collect();
                let frame = crate::push::delta_frame(
                    &d.service, d.base, d.version, &put.iter().collect::<Vec<_>>(), &removed, u32::MAX,
                )
                .unwrap();
                prop_assert_eq!(read(&frame[HEADER_LEN..]), Some(push.clone()));
            }
        }

        #[test]
        fn damaged_pushes_get_the_general_decoders_answer(
            push in arb_push(),
            cut in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let bytes = body(&push);
            agree(&bytes[..cut.index(bytes.len() + 1)])?;
            let mut changed = bytes.clone();
            let i = at.index(changed.len());
            changed[i] = byte;
            agree(&changed)?;
            let mut longer = bytes;
            longer.push(byte);
            agree(&longer)?;
        }

        #[test]
        fn any_bytes_get_the_general_decoders_answer(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            agree(&bytes)?;
        }
    }

    #[test]
    fn what_this_reader_does_not_know_is_left_to_the_general_decoder() {
        let go_away = body(&Push::GoAway {
            reason: "draining".into(),
        });
        assert_eq!(read(&go_away), None);
        assert!(matches!(decode(&go_away), Ok(Push::GoAway { .. })));

        // A field added by a newer server: skipped by the general decoder, as before.
        #[derive(serde::Serialize)]
        struct Newer<'a> {
            service: &'a str,
            version: u64,
            publishers: Vec<PublisherView>,
            shard: u32,
        }
        #[derive(serde::Serialize)]
        enum NewerPush<'a> {
            Snapshot(Newer<'a>),
        }
        let newer = frame::encode(
            &NewerPush::Snapshot(Newer {
                service: "demo",
                version: 3,
                publishers: vec![],
                shard: 1,
            }),
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert_eq!(read(&newer[HEADER_LEN..]), None);
        assert!(matches!(
            decode(&newer[HEADER_LEN..]),
            Ok(Push::Snapshot(s)) if s.version == 3
        ));

        // A service id the server would never send: refused as the general decoder refuses it.
        let mut bad = body(&Push::Delta(Delta {
            service: "demo".parse().unwrap(),
            base: 1,
            version: 2,
            put: vec![],
            removed: vec![],
        }));
        let at = bad.windows(4).position(|w| w == b"demo").unwrap();
        bad[at] = 0x01;
        assert!(matches!(
            decode(&bad),
            Err(crate::Error::InvalidArgument(_))
        ));
    }
}
