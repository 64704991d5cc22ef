//! The decoders under structured mutation: every message a Roster process reads from the network,
//! taken as a valid frame from the corpus in `tests/corpus/` (one file per message kind, checked
//! in; `ROSTER_WRITE_CORPUS=1` rewrites it from [`corpus`]), then mutated the ways a broken or
//! hostile peer would — bits flipped, MessagePack markers swapped for others, lengths lied about,
//! bytes inserted, cut or spliced in from another frame — and fed to the frame reader and to every
//! decoder. Nothing may panic; what decodes must encode and decode again to the same value.
//!
//! Coverage-guided fuzzing needs a nightly toolchain, which CI machines do not have; these run on
//! stable in the normal test suite (`PROPTEST_CASES` raises the count for a longer run by hand).
//! Add a frame that once broke a decoder to the corpus directory: it is replayed on every run.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use bytes::Bytes;
use proptest::prelude::*;
use roster_common::acl::{AclView, Permission, TokenRecord, generate_token};
use roster_common::frame::{self, FrameBuffer};
use roster_common::proto::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

const MAX_FRAME: u32 = 1 << 20;

fn publisher_view(n: u64) -> PublisherView {
    PublisherView {
        health: None,
        persistent: false,
        client_id: format!("client-{n}"),
        register_id: format!("pod-{n}"),
        data: vec![
            Bytes::from(format!("10.0.0.{n}:8080")),
            Bytes::from_static(&[0, 255, 7]),
        ],
        attributes: BTreeMap::from([("zone".to_owned(), "eu-1a".to_owned())]),
        client_version: n,
    }
}

fn publisher(n: u64) -> Publisher {
    let view = publisher_view(n);
    Publisher {
        check: None,
        health: None,
        persistent: false,
        client_id: view.client_id,
        register_id: view.register_id,
        service: "prod/api/web".parse().unwrap(),
        data: view.data,
        attributes: view.attributes,
        client_version: n,
        session: 2,
        session_instance: 0xfeed_beef,
        owner: u128::MAX - n as u128,
        registered_ms: 0,
    }
}

fn snapshot() -> Snapshot {
    Snapshot {
        service: "prod/api/web".parse().unwrap(),
        version: (3 << 32) | 17,
        publishers: (1..4).map(publisher_view).collect(),
    }
}

fn view() -> ClusterView {
    let token = generate_token();
    let record = TokenRecord::of_token(
        &token,
        vec!["*".into()],
        vec![Permission::Publish],
        Some(99),
    )
    .unwrap();
    ClusterView {
        persistent: Default::default(),
        cluster_id: "0123456789abcdef".into(),
        members: vec![Member {
            role: Role::Data,
            id: 1,
            instance: 7,
            addr: "10.0.0.1:7200".into(),
            zone: "a".into(),
            joined_at_ms: 1,
            version: "0.1.0".into(),
        }],
        table: SlotTable {
            epoch: 4,
            slot_count: 4,
            replicas: 2,
            slots: vec![vec![1, 2], vec![2, 1], vec![1], vec![]],
        },
        meta_leader: Some("10.0.0.9:7100".into()),
        acl: AclView {
            enabled: true,
            tokens: vec![record],
        },
    }
}

fn frame_of<T: Serialize>(msg: &T) -> Vec<u8> {
    frame::encode(msg, MAX_FRAME).unwrap().to_vec()
}

/// One valid frame of every kind of message a process reads from a peer or a client.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let service: roster_common::ServiceId = "prod/api/web".parse().unwrap();
    let remove = WriteOp::Remove {
        service: service.clone(),
        client_id: "c".into(),
        register_id: "r".into(),
        session_instance: 9,
        owner: Some(42),
    };
    vec![
        (
            "client-hello",
            frame_of(&ClientRequest::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_id: "c1".into(),
                client_name: "name".into(),
                token: Some(generate_token()),
                client_secret: Bytes::from_static(&[7; 32]),
                capabilities: vec![CAPABILITY_DELTA.into()],
            }),
        ),
        (
            "client-publish",
            frame_of(&ClientRequest::Publish {
                check: None,
                register_id: "r".into(),
                service: service.clone(),
                data: publisher_view(1).data,
                attributes: publisher_view(1).attributes,
                client_version: 3,
            }),
        ),
        (
            "client-unpublish",
            frame_of(&ClientRequest::Unpublish {
                register_id: "r".into(),
                service: Some(service.clone()),
            }),
        ),
        (
            "client-subscribe",
            frame_of(&ClientRequest::Subscribe {
                healthy_only: false,
                register_id: "s".into(),
                service: service.clone(),
                scope: Scope::Zone,
            }),
        ),
        ("client-list", frame_of(&ClientRequest::ListServices {})),
        (
            "reply-welcome",
            frame_of(&reply::<ClientResponse>(Ok(ClientResponse::Welcome {
                protocol_version: 1,
                session_id: 3,
                max_frame: MAX_FRAME,
                idle_timeout_ms: 2500,
                capabilities: vec![CAPABILITY_DELTA.into()],
                max_requests: Some(64),
            }))),
        ),
        (
            "reply-error",
            frame_of(&reply::<ClientResponse>(Err(
                roster_common::Error::NotLeader {
                    leader: Some("10.0.0.2:7200".into()),
                },
            ))),
        ),
        ("push-snapshot", frame_of(&Push::Snapshot(snapshot()))),
        (
            "push-delta",
            frame_of(&Push::Delta(Delta {
                service: service.clone(),
                base: 5,
                version: 9,
                put: vec![publisher_view(4)],
                removed: vec![publisher_view(2).id()],
            })),
        ),
        (
            "push-goaway",
            frame_of(&Push::GoAway {
                reason: "draining".into(),
            }),
        ),
        (
            "meta-register",
            frame_of(&MetaRequest::Register {
                member: view().members[0].clone(),
                cluster_id: Some("0123456789abcdef".into()),
            }),
        ),
        (
            "meta-create-token",
            frame_of(&MetaRequest::CreateToken {
                namespaces: vec!["prod".into(), "*".into()],
                allow: vec![Permission::Publish, Permission::Admin],
                ttl_ms: Some(60_000),
                description: "d".into(),
                by: "op".into(),
            }),
        ),
        (
            "meta-raft",
            frame_of(&MetaRequest::Raft {
                cluster_id: "c".into(),
                from: 2,
                kind: RaftKind::AppendEntries,
                payload: Bytes::from_static(b"\x81\xa4vote\x01"),
            }),
        ),
        ("meta-view", frame_of(&reply::<ClusterView>(Ok(view())))),
        (
            "data-write-batch",
            frame_of(&DataRequest::WriteBatch {
                ops: vec![
                    WriteOp::Put {
                        publisher: publisher(1),
                    },
                    remove.clone(),
                ],
            }),
        ),
        (
            "data-replicate",
            frame_of(&DataRequest::Replicate {
                ops: vec![ReplicatedOp {
                    slot: 3,
                    prev: 1,
                    version: 2,
                    op: remove,
                }],
            }),
        ),
        (
            "data-session-sync",
            frame_of(&DataRequest::SessionSync {
                instance: 4,
                slot: 1,
                publishers: vec![publisher(2), publisher(3)],
            }),
        ),
        (
            "data-datums",
            frame_of(&reply::<DataResponse>(Ok(DataResponse::Datums {
                datums: vec![snapshot()],
            }))),
        ),
        (
            "data-event",
            frame_of(&reply::<DataEvent>(Ok(DataEvent::Changed {
                service,
                version: 10,
                prev: Some(9),
                change: Some(PublisherChange::Put(publisher_view(5))),
            }))),
        ),
    ]
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The checked-in corpus: every file in `tests/corpus/`.
fn checked_in() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus exists")
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_corpus_holds_a_valid_frame_of_every_kind() {
    let built = corpus();
    if std::env::var_os("ROSTER_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(corpus_dir()).unwrap();
        for (name, bytes) in &built {
            std::fs::write(corpus_dir().join(format!("{name}.frame")), bytes).unwrap();
        }
    }
    let files = checked_in();
    for (name, _) in &built {
        assert!(
            files.iter().any(|(f, _)| *f == format!("{name}.frame")),
            "tests/corpus lacks {name}.frame: run this test with ROSTER_WRITE_CORPUS=1"
        );
    }
    // The kinds whose encoding is fixed (no random token inside) are still what this build reads.
    for (name, bytes) in &files {
        let mut buffer = FrameBuffer::new(MAX_FRAME);
        buffer.extend(bytes);
        let body = buffer.next_frame().unwrap().expect("a whole frame");
        assert!(
            decodes_somehow(&body),
            "{name} is not a frame this build reads"
        );
    }
}

/// Feeds `body` to every decoder; true if one of them took it. Panics are the failure.
fn decodes_somehow(body: &[u8]) -> bool {
    let mut any = false;
    any |= round_trips::<ClientRequest>(body);
    any |= round_trips::<Reply<ClientResponse>>(body);
    any |= round_trips::<Push>(body);
    any |= round_trips::<MetaRequest>(body);
    any |= round_trips::<Reply<MetaResponse>>(body);
    any |= round_trips::<Reply<ClusterView>>(body);
    any |= round_trips::<DataRequest>(body);
    any |= round_trips::<Reply<DataResponse>>(body);
    any |= round_trips::<Reply<DataEvent>>(body);
    any
}

/// Decodes `body` as `T`; what decodes must survive another encode and decode unchanged.
fn round_trips<T>(body: &[u8]) -> bool
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = frame::decode::<T>(body) else {
        return false;
    };
    if let Ok(again) = frame::encode(&value, u32::MAX) {
        let back: T =
            frame::decode(&again[4..]).expect("what decoded encodes to something that decodes");
        assert_eq!(back, value, "a decoded value changed on its way around");
    }
    true
}

/// One way a broken or hostile peer changes a frame.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    /// Replaces a byte with a MessagePack marker of another kind (nil, bool, ints of every width,
    /// str/bin/array/map headers, ext, the reserved 0xc1).
    Marker {
        at: usize,
        marker: u8,
    },
    /// A length field (the frame's own or a MessagePack one after a marker) claims more or less.
    Length {
        at: usize,
        value: u32,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        len: usize,
    },
    /// Bytes from another frame of the corpus.
    Splice {
        at: usize,
        from: usize,
        start: usize,
        len: usize,
    },
}

const MARKERS: &[u8] = &[
    0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
    0xd0, 0xd1, 0xd2, 0xd3, 0xd4, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x80, 0x8f, 0x90,
    0x9f, 0xa0, 0xbf, 0x00, 0x7f, 0xe0, 0xff,
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        (any::<usize>(), proptest::sample::select(MARKERS))
            .prop_map(|(at, marker)| Mutation::Marker { at, marker }),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(u32::MAX),
                Just(MAX_FRAME + 1),
                0u32..300
            ]
        )
            .prop_map(|(at, value)| Mutation::Length { at, value }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..64).prop_map(
            |(at, from, start, len)| Mutation::Splice {
                at,
                from,
                start,
                len
            }
        ),
    ]
}

fn apply(frame: &mut Vec<u8>, mutation: &Mutation, corpus: &[(String, Vec<u8>)]) {
    let at = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
    match mutation {
        Mutation::FlipBit { at: i, bit } if !frame.is_empty() => {
            let i = at(*i, frame.len());
            frame[i] ^= 1 << bit;
        }
        Mutation::SetByte { at: i, value } if !frame.is_empty() => {
            let i = at(*i, frame.len());
            frame[i] = *value;
        }
        Mutation::Marker { at: i, marker } if frame.len() > 4 => {
            let i = 4 + at(*i, frame.len() - 4);
            frame[i] = *marker;
        }
        Mutation::Length { at: i, value } => {
            // Half the time the frame header, else a 32-bit length right after some byte.
            let i = if i % 2 == 0 {
                0
            } else {
                at(*i, frame.len().max(1))
            };
            let bytes = value.to_be_bytes();
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = frame.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        Mutation::Insert { at: i, bytes } => {
            let i = at(*i, frame.len() + 1);
            frame.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete { at: i, len } if !frame.is_empty() => {
            let i = at(*i, frame.len());
            let end = (i + len).min(frame.len());
            frame.drain(i..end);
        }
        Mutation::Truncate { len } => {
            let len = at(*len, frame.len() + 1);
            frame.truncate(len);
        }
        Mutation::Splice {
            at: i,
            from,
            start,
            len,
        } => {
            let other = &corpus[from % corpus.len()].1;
            let start = at(*start, other.len());
            let piece = &other[start..(start + len).min(other.len())];
            let i = at(*i, frame.len() + 1);
            frame.splice(i..i, piece.iter().copied());
        }
        _ => {}
    }
}

/// What a reader does with bytes off the wire: cut frames out (the length prefix checked against
/// the limit) and decode each as whatever it might be.
fn read_like_a_server(bytes: &[u8]) {
    let mut buffer = FrameBuffer::new(MAX_FRAME);
    // In two pieces, as a stream delivers them.
    let cut = bytes.len() / 2;
    buffer.extend(&bytes[..cut]);
    buffer.extend(&bytes[cut..]);
    while let Ok(Some(body)) = buffer.next_frame() {
        decodes_somehow(&body);
    }
    // And the body as it is, as a decoder given a frame already cut out would see it.
    if bytes.len() > 4 {
        decodes_somehow(&bytes[4..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(5_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_frames_never_panic_a_decoder(
        pick in any::<usize>(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let corpus = checked_in();
        let mut frame = corpus[pick % corpus.len()].1.clone();
        for m in &mutations {
            apply(&mut frame, m, &corpus);
        }
        read_like_a_server(&frame);
    }
}
