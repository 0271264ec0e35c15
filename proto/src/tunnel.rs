//! The framed preamble on each client->proxy QUIC stream.
//!
//! Frame: the magic `CSTD`, a big-endian u32 body length, then a protobuf body
//! ([`StreamOpen`] from the client, [`StreamAccept`] from the proxy). After the two frames
//! the stream carries the target protocol's bytes unchanged.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use thiserror::Error;

pub use crate::pb::v1::{AcceptStatus, StreamAccept, StreamOpen};

/// First four bytes of every preamble frame.
pub const MAGIC: &[u8; 4] = b"CSTD";
/// Preamble version this build speaks.
pub const VERSION: u32 = 1;
/// Largest preamble body accepted. Bounds the token and resource name.
pub const MAX_FRAME: usize = 64 * 1024;
/// ALPN protocol id of the custody tunnel.
pub const ALPN: &[u8] = b"custody/1";

/// A preamble frame could not be decoded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The stream did not start with `CSTD`: not a custody client.
    #[error("stream does not start with the custody preamble (expected magic CSTD)")]
    BadMagic,
    /// The declared length exceeds [`MAX_FRAME`].
    #[error("preamble of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid protobuf message.
    #[error("malformed preamble: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed; on
/// success the frame's bytes are removed from `buf`.
pub fn decode<M: Message + Default>(buf: &mut BytesMut) -> Result<Option<M>, TunnelError> {
    let have = buf.len().min(MAGIC.len());
    if buf[..have] != MAGIC[..have] {
        return Err(TunnelError::BadMagic);
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_FRAME {
        return Err(TunnelError::TooLarge { len, max: MAX_FRAME });
    }
    if buf.len() < 8 + len {
        buf.reserve(8 + len - buf.len());
        return Ok(None);
    }
    buf.advance(8);
    let body = buf.split_to(len);
    Ok(Some(M::decode(body.freeze())?))
}

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(8 + len);
    out.put_slice(MAGIC);
    // Bodies we build are far below u32::MAX; saturate rather than wrap if one is not.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    msg.encode(&mut out)
        .expect("Vec<u8> grows as needed, so encoding cannot run out of space");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let open = StreamOpen {
            version: VERSION,
            resource: "pg-prod".into(),
            token: "t".repeat(3000),
            ..Default::default()
        };
        let bytes = encode(&open);
        for cut in 0..bytes.len() {
            let mut b = BytesMut::from(&bytes[..cut]);
            assert!(decode::<StreamOpen>(&mut b).unwrap().is_none(), "cut {cut}");
        }
        let mut b = BytesMut::from(&bytes[..]);
        b.extend_from_slice(b"rest");
        let got: StreamOpen = decode(&mut b).unwrap().unwrap();
        assert_eq!(got, open);
        assert_eq!(&b[..], b"rest", "bytes after the frame are left in place");
    }

    #[test]
    fn garbage_and_oversize_are_refused_early() {
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(decode::<StreamOpen>(&mut b), Err(TunnelError::BadMagic)));
        let mut b = BytesMut::from(&b"CS"[..]);
        assert!(decode::<StreamOpen>(&mut b).unwrap().is_none());
        let mut b = BytesMut::from(&b"CSTD\xff\xff\xff\xff"[..]);
        assert!(matches!(decode::<StreamOpen>(&mut b), Err(TunnelError::TooLarge { .. })));
        assert!(b.capacity() < 1024 * 1024, "no allocation from a declared length");
        let mut b = BytesMut::from(&b"CSTD\x00\x00\x00\x02\xff\xff"[..]);
        assert!(matches!(decode::<StreamOpen>(&mut b), Err(TunnelError::Malformed(_))));
    }
}
