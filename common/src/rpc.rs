//! One request, one reply, on one bidirectional stream.

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::frame;
use crate::proto::{Reply, reply};

/// How long a server waits for a request frame on a stream the peer opened.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Application error code a server uses to stop a stream whose request it refused.
pub const STOP_REFUSED: VarInt = VarInt::from_u32(1);

/// Sends `request` on a fresh stream of `conn` and waits up to `timeout` for the reply.
pub async fn call<Req, Resp>(
    conn: &Connection,
    request: &Req,
    max_frame: u32,
    timeout: Duration,
) -> Result<Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let frame = frame::encode(request, max_frame)?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        // A server that refuses the request (too large, say) stops reading and still replies, so a
        // failed write is reported only when no reply follows.
        let written = send.write_all(&frame).await;
        let _ = send.finish();
        match frame::read_frame::<_, Reply<Resp>>(&mut recv, max_frame).await {
            Ok(Some(Ok(body))) => Ok(body),
            Ok(Some(Err(wire))) => Err(Error::from_wire(wire)),
            Ok(None) => Err(match written {
                Err(e) => e.into(),
                Ok(()) => Error::Connection("the peer closed the stream without a reply".into()),
            }),
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout(format!("no reply within {timeout:?}"))),
    }
}

/// Reads the request frame of a stream a peer opened. On failure the stream is stopped, so the peer
/// stops sending; the caller should still answer with the error.
pub async fn read_request<T: DeserializeOwned>(recv: &mut RecvStream, max_frame: u32) -> Result<T> {
    let result = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        frame::read_frame(recv, max_frame),
    )
    .await
    {
        Ok(Ok(Some(request))) => Ok(request),
        Ok(Ok(None)) => Err(Error::BadFrame(
            "the stream ended before a request frame".into(),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Timeout(format!(
            "no complete request frame within {REQUEST_READ_TIMEOUT:?}"
        ))),
    };
    if result.is_err() {
        let _ = recv.stop(STOP_REFUSED);
    }
    result
}

/// Writes the reply frame and finishes the stream.
pub async fn send_reply<T: Serialize>(
    send: &mut SendStream,
    result: Result<T>,
    max_frame: u32,
) -> Result<()> {
    let framed = match frame::encode(&reply(result), max_frame) {
        Ok(framed) => framed,
        // The answer itself is too large: say so instead.
        Err(e) => frame::encode(&reply::<()>(Err(e)), max_frame)?,
    };
    send.write_all(&framed).await?;
    let _ = send.finish();
    Ok(())
}
