//! The frame codec: a 4-byte big-endian length, then one MessagePack value with named fields.
//!
//! The length counts only the MessagePack bytes that follow it. A reader checks the length against
//! its `max_frame` before reading the body, so an oversized frame costs the receiver four bytes.
//! Decoding tells apart bytes that are not MessagePack at all ([`Error::BadFrame`]) from a
//! well-formed value that is not the message expected on this stream ([`Error::UnexpectedMessage`]).

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// The largest frame accepted unless configured otherwise: 1 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Encodes `msg` as one frame (header included), refusing it if the body exceeds `max_frame`.
pub fn encode<T: Serialize>(msg: &T, max_frame: u32) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(128);
    buf.put_u32(0);
    {
        let mut writer = (&mut buf).writer();
        let mut ser = rmp_serde::Serializer::new(&mut writer).with_struct_map();
        msg.serialize(&mut ser)
            .map_err(|e| Error::Internal(format!("cannot encode message: {e}")))?;
    }
    let body_len = buf.len() - HEADER_LEN;
    if body_len > max_frame as usize {
        return Err(Error::FrameTooLarge(format!(
            "message of {body_len} bytes exceeds the frame limit of {max_frame} bytes"
        )));
    }
    buf[..HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(buf.freeze())
}

/// Marks a deserialization error raised by a value's own validation (a malformed service id, say)
/// rather than by the shape of the message: [`decode`] answers it `InvalidArgument`.
pub(crate) const REFUSED_VALUE: &str = "refused value: ";

/// Decodes one frame body. Bytes that are not one MessagePack value are `BadFrame`; a value that
/// is not a message of type `T` (unknown variant, missing field, wrong type) is
/// `UnexpectedMessage`; a message with a value its type refuses is `InvalidArgument`.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    // Read straight from the slice: the generic reader would copy every string and byte string
    // through a buffer grown by `read_to_end`.
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    let result = T::deserialize(&mut de);
    match result {
        // Nothing may follow the value: reading another must find the end of the body.
        Ok(msg) => match serde::de::IgnoredAny::deserialize(&mut de) {
            Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Ok(msg)
            }
            _ => Err(Error::BadFrame(
                "trailing bytes after the MessagePack value".into(),
            )),
        },
        Err(e) => {
            // Was it MessagePack of the wrong shape, or not MessagePack at all?
            let mut probe = body;
            let mut de = rmp_serde::Deserializer::new(&mut probe);
            let well_formed =
                serde::de::IgnoredAny::deserialize(&mut de).is_ok() && probe.is_empty();
            let text = e.to_string();
            if well_formed && let Some(at) = text.find(REFUSED_VALUE) {
                Err(Error::InvalidArgument(
                    text[at + REFUSED_VALUE.len()..].to_owned(),
                ))
            } else if well_formed {
                Err(Error::UnexpectedMessage(format!(
                    "a well-formed MessagePack value that is not a valid message here: {e}"
                )))
            } else {
                Err(Error::BadFrame(format!("not a MessagePack value: {e}")))
            }
        }
    }
}

/// Writes `msg` as one frame.
pub async fn write_frame<W, T>(writer: &mut W, msg: &T, max_frame: u32) -> Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode(msg, max_frame)?;
    writer
        .write_all(&frame)
        .await
        .map_err(|e| Error::Connection(format!("write failed: {e}")))
}

/// Reads the next frame's body. `Ok(None)` means the stream ended cleanly before a frame began.
pub async fn read_frame_bytes<R>(reader: &mut R, max_frame: u32) -> Result<Option<Vec<u8>>>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader
            .read(&mut header[filled..])
            .await
            .map_err(|e| Error::Connection(format!("read failed: {e}")))?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(Error::BadFrame(format!(
                "stream ended after {filled} bytes of a 4-byte frame header"
            )));
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header);
    if len > max_frame {
        return Err(Error::FrameTooLarge(format!(
            "frame of {len} bytes exceeds the limit of {max_frame} bytes"
        )));
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::BadFrame(format!("stream ended inside a frame of {len} bytes"))
        } else {
            Error::Connection(format!("read failed: {e}"))
        }
    })?;
    Ok(Some(body))
}

/// Frames cut out of a byte stream that arrives in pieces of any size: feed it what was read,
/// take the complete frames. No I/O, so a reader can hand it whole chunks (one lock of the
/// stream per chunk, however many frames it holds) instead of reading each header and body.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: BytesMut,
    max_frame: u32,
}

impl FrameBuffer {
    pub fn new(max_frame: u32) -> Self {
        FrameBuffer {
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's body, `None` until one is complete. A frame announcing more than
    /// `max_frame` bytes is an error as soon as its header is in.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..HEADER_LEN].try_into().expect("four bytes"));
        if len > self.max_frame {
            return Err(Error::FrameTooLarge(format!(
                "frame of {len} bytes exceeds the limit of {} bytes",
                self.max_frame
            )));
        }
        if self.buf.len() < HEADER_LEN + len as usize {
            return Ok(None);
        }
        let _ = self.buf.split_to(HEADER_LEN);
        Ok(Some(self.buf.split_to(len as usize).freeze()))
    }

    /// Bytes of a frame begun but not complete: not zero when the stream ends means it ended
    /// inside a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads and decodes the next frame. `Ok(None)` means the stream ended cleanly.
pub async fn read_frame<R, T>(reader: &mut R, max_frame: u32) -> Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_frame_bytes(reader, max_frame).await? {
        Some(body) => decode(&body).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[test]
    fn a_frame_buffer_cuts_frames_out_of_pieces_of_any_size() {
        let frames: Vec<Bytes> = (0..5u32)
            .map(|i| encode(&vec![i; i as usize * 7], DEFAULT_MAX_FRAME).unwrap())
            .collect();
        let stream: Vec<u8> = frames.concat();
        for piece in [1, 3, 4, 17, stream.len()] {
            let mut buffer = FrameBuffer::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                buffer.extend(chunk);
                while let Some(body) = buffer.next_frame().unwrap() {
                    got.push(decode::<Vec<u32>>(&body).unwrap());
                }
            }
            assert_eq!(buffer.pending(), 0);
            let want: Vec<Vec<u32>> = (0..5u32).map(|i| vec![i; i as usize * 7]).collect();
            assert_eq!(got, want, "pieces of {piece} bytes");
        }
        let mut buffer = FrameBuffer::new(8);
        buffer.extend(&[0, 0, 0, 9]);
        assert!(matches!(buffer.next_frame(), Err(Error::FrameTooLarge(_))));
    }

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Put {
            key: String,
            #[serde(with = "serde_bytes")]
            value: Vec<u8>,
            tags: BTreeMap<String, String>,
        },
        Ping {},
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs = vec![
            Msg::Put {
                key: "k".into(),
                value: vec![1, 2, 3],
                tags: BTreeMap::from([("zone".into(), "a".into())]),
            },
            Msg::Ping {},
        ];
        for m in &msgs {
            write_frame(&mut a, m, DEFAULT_MAX_FRAME).await.unwrap();
        }
        drop(a);
        for m in &msgs {
            let got: Msg = read_frame(&mut b, DEFAULT_MAX_FRAME)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got, m);
        }
        assert!(
            read_frame::<_, Msg>(&mut b, DEFAULT_MAX_FRAME)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn named_fields_and_binary_payloads_on_the_wire() {
        let frame = encode(
            &Msg::Put {
                key: "k".into(),
                value: vec![0xff],
                tags: BTreeMap::new(),
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        let body = &frame[HEADER_LEN..];
        // {"Put": {"key": "k", "value": bin8[0xff], "tags": {}}}
        assert_eq!(body[0], 0x81, "outer map of one entry");
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("Put") && text.contains("key") && text.contains("value"));
        assert!(
            body.windows(3).any(|w| w == [0xc4, 0x01, 0xff]),
            "payload is msgpack bin"
        );
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            body.len()
        );
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_the_body() {
        let mut input: &[u8] = &[0x00, 0x20, 0x00, 0x00, 1, 2, 3];
        let err = read_frame::<_, Msg>(&mut input, DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge(_)), "{err:?}");
        assert_eq!(input, &[1, 2, 3], "the body was not read");

        let big = Msg::Put {
            key: "k".into(),
            value: vec![0; 2048],
            tags: BTreeMap::new(),
        };
        assert!(matches!(encode(&big, 1024), Err(Error::FrameTooLarge(_))));
    }

    #[test]
    fn garbage_and_wrong_messages_are_told_apart() {
        assert!(matches!(decode::<Msg>(&[0xc1]), Err(Error::BadFrame(_))));
        let other = rmp_serde::to_vec_named(&BTreeMap::from([("Nope", 1)])).unwrap();
        assert!(matches!(
            decode::<Msg>(&other),
            Err(Error::UnexpectedMessage(_))
        ));
        let mut trailing = rmp_serde::to_vec_named(&Msg::Ping {}).unwrap();
        trailing.push(0);
        assert!(matches!(decode::<Msg>(&trailing), Err(Error::BadFrame(_))));
    }

    #[test]
    fn a_value_its_type_refuses_is_an_invalid_argument() {
        #[derive(Serialize)]
        struct Raw<'a> {
            service: &'a str,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Typed {
            service: crate::ServiceId,
        }
        let long = "x".repeat(600);
        let body = rmp_serde::to_vec_named(&Raw { service: &long }).unwrap();
        match decode::<Typed>(&body) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.starts_with("service id"), "{m}");
                assert!(!m.contains(REFUSED_VALUE), "{m}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        let body = rmp_serde::to_vec_named(&BTreeMap::from([("service", 7)])).unwrap();
        assert!(
            matches!(decode::<Typed>(&body), Err(Error::UnexpectedMessage(_))),
            "a wrong type is still a wrong message"
        );
    }

    #[tokio::test]
    async fn truncated_frames_are_bad_frames() {
        let mut header_only: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame::<_, Msg>(&mut header_only, 64).await,
            Err(Error::BadFrame(_))
        ));
        let mut short_body: &[u8] = &[0, 0, 0, 9, 1];
        assert!(matches!(
            read_frame::<_, Msg>(&mut short_body, 64).await,
            Err(Error::BadFrame(_))
        ));
    }

    proptest! {
        #[test]
        fn any_message_round_trips(key in ".{0,40}", value in proptest::collection::vec(any::<u8>(), 0..256),
                                   tags in proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4)) {
            let msg = Msg::Put { key, value, tags };
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            let back: Msg = decode(&frame[HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Msg>(&bytes);
        }
    }
}
