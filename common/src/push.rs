//! Push frames assembled from publishers encoded once.
//!
//! A session server pushes the same publisher to many subscribers, and a large service's snapshot
//! to every new subscriber. Encoding each publisher once, when it arrives, and assembling push
//! frames from those bytes makes a push cost a copy of what it carries, and lets the server weigh
//! a delta against a full snapshot by size before building either.
//!
//! The frames are exactly what `frame::encode(&Push::Snapshot(..))` and
//! `frame::encode(&Push::Delta(..))` produce for the same content (the tests decode them back);
//! `docs/PROTOCOL.md` §4 specifies both. [`decode`] reads them back, as a client does.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::frame::HEADER_LEN;
use crate::ids::{ClientId, RegisterId, ServiceId, Version};
use crate::proto::{PublisherView, Push};

mod read;

pub use read::decode;

/// One publisher as MessagePack, the way it appears in a push.
pub fn encode_publisher(view: &PublisherView) -> Bytes {
    // Serializing a plain struct into memory cannot fail.
    Bytes::from(rmp_serde::to_vec_named(view).expect("a publisher encodes"))
}

/// The encoded size of the entry `{"client_id": .., "register_id": ..}` naming a removed
/// publisher, for weighing a delta.
pub fn removed_len(client_id: &str, register_id: &str) -> usize {
    1 + str_len("client_id") + str_len(client_id) + str_len("register_id") + str_len(register_id)
}

/// A `Snapshot` push of `service` at `version` whose publishers are `publishers`, each already
/// encoded by [`encode_publisher`], in `(client_id, register_id)` order.
pub fn snapshot_frame<'a>(
    service: &ServiceId,
    version: Version,
    publishers: impl ExactSizeIterator<Item = &'a Bytes>,
    max_frame: u32,
) -> Result<Bytes> {
    let mut out = Frame::new();
    out.map(1);
    out.str("Snapshot");
    out.map(3);
    out.str("service");
    out.str(service.as_str());
    out.str("version");
    out.uint(version);
    out.str("publishers");
    out.array(publishers.len());
    for p in publishers {
        out.raw(p);
    }
    out.finish(max_frame)
}

/// A `Delta` push of `service` from `base` to `version`: `put` publishers encoded by
/// [`encode_publisher`], and the `(client_id, register_id)` of those `removed`, each list in
/// `(client_id, register_id)` order. Empty lists are left out, as the serde encoding does.
pub fn delta_frame<'a>(
    service: &ServiceId,
    base: Version,
    version: Version,
    put: &[&'a Bytes],
    removed: &[(&'a str, &'a str)],
    max_frame: u32,
) -> Result<Bytes> {
    let mut out = Frame::new();
    out.map(1);
    out.str("Delta");
    out.map(3 + usize::from(!put.is_empty()) + usize::from(!removed.is_empty()));
    out.str("service");
    out.str(service.as_str());
    out.str("base");
    out.uint(base);
    out.str("version");
    out.uint(version);
    if !put.is_empty() {
        out.str("put");
        out.array(put.len());
        for p in put {
            out.raw(p);
        }
    }
    if !removed.is_empty() {
        out.str("removed");
        out.array(removed.len());
        for (client_id, register_id) in removed {
            out.map(2);
            out.str("client_id");
            out.str(client_id);
            out.str("register_id");
            out.str(register_id);
        }
    }
    out.finish(max_frame)
}

/// What a client holds of one subscription from its pushes, following `docs/PROTOCOL.md` §4 to
/// the letter and refusing anything else: snapshots replace, deltas apply on exactly their base,
/// versions strictly increase. The reference the tests check servers against.
#[derive(Clone, Debug, Default)]
pub struct Replica {
    pub version: Option<Version>,
    pub publishers: BTreeMap<(ClientId, RegisterId), PublisherView>,
    /// Pushes applied, by kind.
    pub snapshots: usize,
    pub deltas: usize,
}

impl Replica {
    /// Applies one push, or says why it cannot be.
    pub fn apply(&mut self, push: Push) -> std::result::Result<(), String> {
        match push {
            Push::Snapshot(s) => {
                if self.version.is_some_and(|v| v >= s.version) {
                    return Err(format!("snapshot {} after {:?}", s.version, self.version));
                }
                self.snapshots += 1;
                self.version = Some(s.version);
                self.publishers = s
                    .publishers
                    .into_iter()
                    .map(|p| ((p.client_id.clone(), p.register_id.clone()), p))
                    .collect();
            }
            Push::Delta(d) => {
                if self.version != Some(d.base) || d.version <= d.base {
                    return Err(format!(
                        "delta {}..{} on a copy at {:?}",
                        d.base, d.version, self.version
                    ));
                }
                self.deltas += 1;
                for id in d.removed {
                    self.publishers.remove(&(id.client_id, id.register_id));
                }
                for p in d.put {
                    self.publishers
                        .insert((p.client_id.clone(), p.register_id.clone()), p);
                }
                self.version = Some(d.version);
            }
            Push::GoAway { .. } => {}
        }
        Ok(())
    }

    /// Every publisher's data items as text, sorted.
    pub fn addresses(&self) -> Vec<String> {
        data_text(self.publishers.values())
    }
}

/// The data items of `publishers` as text (lossy for what is not UTF-8), sorted.
pub fn data_text<'a>(publishers: impl IntoIterator<Item = &'a PublisherView>) -> Vec<String> {
    let mut out: Vec<String> = publishers
        .into_iter()
        .flat_map(|p| {
            p.data
                .iter()
                .map(|d| String::from_utf8_lossy(d).into_owned())
        })
        .collect();
    out.sort();
    out
}

/// The MessagePack length of a string of `s.len()` bytes, header included.
fn str_len(s: &str) -> usize {
    let n = s.len();
    n + match n {
        0..=31 => 1,
        32..=255 => 2,
        256..=65535 => 3,
        _ => 5,
    }
}

/// A frame being written: the length header first, filled in by `finish`.
struct Frame(BytesMut);

impl Frame {
    fn new() -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_u32(0);
        Frame(buf)
    }

    fn writer(&mut self) -> bytes::buf::Writer<&mut BytesMut> {
        (&mut self.0).writer()
    }

    // Writing MessagePack headers into memory cannot fail; the results are ignored for that reason.
    fn map(&mut self, len: usize) {
        let _ = rmp::encode::write_map_len(&mut self.writer(), len as u32);
    }

    fn array(&mut self, len: usize) {
        let _ = rmp::encode::write_array_len(&mut self.writer(), len as u32);
    }

    fn str(&mut self, s: &str) {
        let _ = rmp::encode::write_str(&mut self.writer(), s);
    }

    fn uint(&mut self, v: u64) {
        let _ = rmp::encode::write_uint(&mut self.writer(), v);
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn finish(mut self, max_frame: u32) -> Result<Bytes> {
        let body = self.0.len() - HEADER_LEN;
        if body > max_frame as usize {
            return Err(Error::FrameTooLarge(format!(
                "push of {body} bytes exceeds the frame limit of {max_frame} bytes"
            )));
        }
        self.0[..HEADER_LEN].copy_from_slice(&(body as u32).to_be_bytes());
        Ok(self.0.freeze())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::frame::{self, DEFAULT_MAX_FRAME};
    use crate::proto::{Delta, PublisherId, Push, Snapshot};

    fn view(client: &str, reg: &str, data: &[u8], attrs: &[(&str, &str)], v: u64) -> PublisherView {
        PublisherView {
            health: None,
            persistent: false,
            client_id: client.into(),
            register_id: reg.into(),
            data: vec![Bytes::copy_from_slice(data)],
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            client_version: v,
        }
    }

    #[test]
    fn assembled_frames_are_the_serde_encoding() {
        let service: ServiceId = "ns/g/payments".parse().unwrap();
        let a = view("c1", "r1", b"10.0.0.1:80", &[("zone", "a")], 3);
        let b = view("c2", "r", b"", &[], u64::MAX);
        let encoded = [encode_publisher(&a), encode_publisher(&b)];
        let snapshot = Snapshot {
            service: service.clone(),
            version: 1 << 40,
            publishers: vec![a.clone(), b.clone()],
        };
        let built = snapshot_frame(&service, 1 << 40, encoded.iter(), DEFAULT_MAX_FRAME).unwrap();
        let by_serde = frame::encode(&Push::Snapshot(snapshot), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(built, by_serde);

        let delta = Delta {
            service: service.clone(),
            base: 7,
            version: 300,
            put: vec![a],
            removed: vec![PublisherId {
                client_id: "c9".into(),
                register_id: "gone".into(),
            }],
        };
        let built = delta_frame(
            &service,
            7,
            300,
            &[&encoded[0]],
            &[("c9", "gone")],
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert_eq!(
            built,
            frame::encode(&Push::Delta(delta), DEFAULT_MAX_FRAME).unwrap()
        );
        let only_removal =
            delta_frame(&service, 1, 2, &[], &[("c", "r")], DEFAULT_MAX_FRAME).unwrap();
        let back: Push = frame::decode(&only_removal[HEADER_LEN..]).unwrap();
        assert!(matches!(back, Push::Delta(d) if d.put.is_empty() && d.removed.len() == 1));
    }

    #[test]
    fn the_removed_entry_size_is_exact() {
        let service: ServiceId = "demo".parse().unwrap();
        let long = "x".repeat(40);
        let one = delta_frame(&service, 1, 2, &[], &[("c", &long)], u32::MAX).unwrap();
        let two =
            delta_frame(&service, 1, 2, &[], &[("c", &long), ("c", &long)], u32::MAX).unwrap();
        assert_eq!(two.len() - one.len(), removed_len("c", &long));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused() {
        let service: ServiceId = "demo".parse().unwrap();
        let big = encode_publisher(&view("c", "r", &[0; 2048], &[], 1));
        assert!(matches!(
            snapshot_frame(&service, 1, [&big].into_iter(), 1024),
            Err(Error::FrameTooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn snapshots_of_any_publishers_decode_back(
            entries in proptest::collection::btree_map(
                ("[a-z]{1,40}", "[a-z0-9]{1,300}"),
                (proptest::collection::vec(any::<u8>(), 0..100), any::<u64>()),
                0..40,
            ),
            version in any::<u64>(),
        ) {
            let service: ServiceId = "svc".parse().unwrap();
            let views: Vec<PublisherView> = entries
                .iter()
                .map(|((c, r), (d, v))| view(c, r, d, &[], *v))
                .collect();
            let encoded: Vec<Bytes> = views.iter().map(encode_publisher).collect();
            let built = snapshot_frame(&service, version, encoded.iter(), u32::MAX).unwrap();
            let back: Push = frame::decode(&built[HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, Push::Snapshot(Snapshot { service, version, publishers: views }));
        }
    }
}
