//! A sans-IO codec for the PostgreSQL v3 wire protocol, as a proxy needs it: strict limits
//! on every length, no allocation sized by an unchecked wire value, and zero-copy views
//! into the frame so a relayed message is forwarded byte-for-byte.
//!
//! Decoding is two steps. [`decode_frame`] splits one `tag, len, body` frame off a buffer
//! after checking `4 <= len <= limit(tag)`. [`Frontend::parse`] / [`Backend::parse`] then
//! decode the bounded body and reject trailing bytes.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::reader::{ReadError, Reader};

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;
/// Protocol 3.0 in a startup packet.
pub const PROTOCOL_3_0: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Upper bound for messages that only carry names and small integers.
const SMALL_MESSAGE: usize = 64 * 1024;

/// A frame or packet broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length field is outside what this message type allows.
    #[error("invalid length {len} for message type {tag:?} (allowed {min}..={max} bytes)")]
    BadLength {
        /// Message type byte, as a char.
        tag: char,
        /// Declared length, including the 4 length bytes.
        len: u64,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The startup packet's length is outside `8..=MAX_STARTUP`.
    #[error("invalid startup packet length {0} (allowed 8..=10000)")]
    BadStartupLength(u64),
    /// A startup packet asked for a protocol this proxy does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: custody speaks 3.0")]
    UnsupportedVersion {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// The message type byte is not one the peer may send.
    #[error("unexpected message type {0:?}")]
    UnknownTag(char),
    /// A field inside the body could not be decoded.
    #[error("malformed {what} message: {source}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What was wrong.
        source: ReadError,
    },
}

impl CodecError {
    /// The SQLSTATE a proxy reports for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CodecError::BadLength { max, len, .. } if *len > *max as u64 => "54000",
            _ => "08P01",
        }
    }
}

fn malformed(what: &'static str) -> impl Fn(ReadError) -> CodecError + Copy {
    move |source| CodecError::Malformed { what, source }
}

/// One complete frame: `raw` is the whole message, tag and length included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The raw bytes, forwarded unchanged.
    pub raw: Bytes,
}

impl Frame {
    /// The type byte.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }
    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Which side sent a frame; limits differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to server.
    Frontend,
    /// Server to client.
    Backend,
}

/// The allowed range of the length field (which counts itself) for `tag` from `side`.
pub fn length_range(side: Side, tag: u8, max_message: usize) -> Option<(usize, usize)> {
    let big = max_message.saturating_add(4);
    let r = match (side, tag) {
        (Side::Frontend, b'S' | b'H' | b'X' | b'c') => (4, 4),
        (Side::Frontend, b'E' | b'D' | b'C') => (5, SMALL_MESSAGE),
        (Side::Frontend, b'Q' | b'P' | b'B' | b'd' | b'f' | b'F' | b'p') => (4, big),
        (Side::Backend, b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c') => (4, 4),
        (Side::Backend, b'Z') => (5, 5),
        (Side::Backend, b'K') => (12, 4 + 4 + 256),
        (Side::Backend, b'R' | b'S' | b'v') => (8, SMALL_MESSAGE),
        (Side::Backend, b'T' | b't' | b'G' | b'H' | b'W' | b'C') => (4, big.min(16 * 1024 * 1024)),
        (Side::Backend, b'D' | b'd' | b'E' | b'N' | b'A' | b'V') => (4, big),
        _ => return None,
    };
    Some(r)
}

/// Splits one frame off the front of `buf`. `Ok(None)`: more bytes are needed. Nothing is
/// reserved until the declared length has been checked against the limit for its type.
pub fn decode_frame(
    buf: &mut BytesMut,
    side: Side,
    max_message: usize,
) -> Result<Option<Frame>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let tag = buf[0];
    let (min, max) =
        length_range(side, tag, max_message).ok_or(CodecError::UnknownTag(tag as char))?;
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < min || len > max {
        return Err(CodecError::BadLength {
            tag: tag as char,
            len: len as u64,
            min,
            max,
        });
    }
    let total = len + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// The largest DataRow or CopyData the proxy streams through: PostgreSQL itself never
/// builds a message of 1 GiB or more, so anything near 2 GiB is not a server talking.
pub const MAX_STREAMED: usize = 2 << 30;

/// If `buf` starts with the header of a server DataRow (`D`) or CopyData (`d`) whose whole
/// frame is larger than `threshold` bytes, returns its type and total frame length (type
/// byte included) so that the caller can pass the frame through as it arrives instead of
/// holding it. `Ok(None)`: not such a frame, or the header is incomplete.
pub fn streamable_backend_frame(buf: &[u8], threshold: usize) -> Result<Option<(u8, usize)>, CodecError> {
    if buf.len() < 5 || !matches!(buf[0], b'D' | b'd') {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let total = len.saturating_add(1);
    if total <= threshold {
        return Ok(None);
    }
    if len > MAX_STREAMED {
        return Err(CodecError::BadLength { tag: buf[0] as char, len: len as u64, min: 4, max: MAX_STREAMED });
    }
    Ok(Some((buf[0], total)))
}

/// The first packet on a connection, which has no type byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Asks for TLS. A proxy on the loopback leg answers `N`.
    SslRequest,
    /// Asks for GSSAPI encryption; answered `N`.
    GssEncRequest,
    /// Cancels the query running on the backend with this key.
    Cancel {
        /// Backend process id.
        pid: i32,
        /// Secret key bytes (4 in protocol 3.0).
        key: Bytes,
    },
    /// A protocol 3.0 startup message.
    Startup {
        /// `name, value` pairs: user, database, application_name, options, ...
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// A startup parameter by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes a startup-phase packet (length-prefixed, no type byte).
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(CodecError::BadStartupLength(len as u64));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len).freeze();
    let mut r = Reader::new(&packet[4..]);
    let m = malformed("startup");
    let code = r.u32("protocol code").map_err(&m)?;
    let out = match code {
        SSL_REQUEST => Startup::SslRequest,
        GSSENC_REQUEST => Startup::GssEncRequest,
        CANCEL_REQUEST => {
            let pid = r.i32("pid").map_err(malformed("CancelRequest"))?;
            let key = r.rest();
            if key.is_empty() || key.len() > 256 {
                return Err(CodecError::Malformed {
                    what: "CancelRequest",
                    source: ReadError::BadCount {
                        what: "secret key length",
                        value: key.len() as i64,
                    },
                });
            }
            return Ok(Some(Startup::Cancel {
                pid,
                key: packet.slice(12..),
            }));
        }
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let name = r.cstr("parameter name").map_err(malformed("startup"))?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr("parameter value").map_err(malformed("startup"))?;
                params.push((lossy(name), lossy(value)));
            }
            r.finish().map_err(malformed("startup"))?;
            return Ok(Some(Startup::Startup { params }));
        }
        other => {
            return Err(CodecError::UnsupportedVersion {
                major: (other >> 16) as u16,
                minor: (other & 0xffff) as u16,
            })
        }
    };
    r.finish().map_err(malformed("startup"))?;
    Ok(Some(out))
}

/// Text from the wire, with invalid UTF-8 replaced (it is recorded, not executed).
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A decoded frontend (client) message, borrowing from its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// Simple query.
    Query {
        /// SQL text.
        sql: &'a [u8],
    },
    /// Prepare a statement.
    Parse {
        /// Statement name; empty is the unnamed statement.
        name: &'a [u8],
        /// SQL text.
        sql: &'a [u8],
        /// Parameter type OIDs (0 = unspecified).
        param_types: Vec<u32>,
    },
    /// Bind parameters to a statement, creating a portal.
    Bind {
        /// Portal name.
        portal: &'a [u8],
        /// Statement name.
        statement: &'a [u8],
        /// Parameter format codes (0 text, 1 binary): none, one for all, or one each.
        formats: Vec<i16>,
        /// Parameter values; `None` is SQL NULL.
        params: Vec<Option<&'a [u8]>>,
        /// Result column format codes.
        result_formats: Vec<i16>,
    },
    /// Run a portal.
    Execute {
        /// Portal name.
        portal: &'a [u8],
        /// Row limit, 0 for all.
        max_rows: i32,
    },
    /// Describe a statement (`S`) or portal (`P`).
    Describe {
        /// `S` or `P`.
        kind: u8,
        /// Name.
        name: &'a [u8],
    },
    /// Close a statement (`S`) or portal (`P`).
    Close {
        /// `S` or `P`.
        kind: u8,
        /// Name.
        name: &'a [u8],
    },
    /// End of an extended-protocol batch.
    Sync,
    /// Ask the server to send what it has.
    Flush,
    /// Close the connection.
    Terminate,
    /// COPY FROM STDIN data.
    CopyData(&'a [u8]),
    /// End of COPY FROM STDIN.
    CopyDone,
    /// Abort COPY FROM STDIN.
    CopyFail {
        /// Reason.
        message: &'a [u8],
    },
    /// Fast-path function call.
    FunctionCall {
        /// Function OID.
        oid: u32,
        /// Argument format codes.
        formats: Vec<i16>,
        /// Arguments; `None` is NULL.
        args: Vec<Option<&'a [u8]>>,
        /// Result format code.
        result_format: i16,
    },
    /// Password / SASL response (only valid during authentication).
    Password(&'a [u8]),
}

fn read_values<'a>(
    r: &mut Reader<'a>,
    what: &'static str,
) -> Result<Vec<Option<&'a [u8]>>, CodecError> {
    let m = malformed(what);
    let n = r.count_i16(4, "value count").map_err(&m)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32("value length").map_err(&m)?;
        if len == -1 {
            out.push(None);
        } else if len < 0 {
            return Err(CodecError::Malformed {
                what,
                source: ReadError::BadCount {
                    what: "value length",
                    value: len as i64,
                },
            });
        } else {
            out.push(Some(r.take(len as usize, "value").map_err(&m)?));
        }
    }
    Ok(out)
}

fn read_formats(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<i16>, CodecError> {
    let m = malformed(what);
    let n = r.count_i16(2, "format count").map_err(&m)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.i16("format code").map_err(&m)?);
    }
    Ok(out)
}

impl<'a> Frontend<'a> {
    /// Decodes a frame from the client.
    pub fn parse(frame: &'a Frame) -> Result<Self, CodecError> {
        let mut r = Reader::new(frame.body());
        let msg = match frame.tag() {
            b'Q' => {
                let m = malformed("Query");
                Frontend::Query {
                    sql: r.cstr("query").map_err(&m)?,
                }
            }
            b'P' => {
                let m = malformed("Parse");
                let name = r.cstr("statement name").map_err(&m)?;
                let sql = r.cstr("query").map_err(&m)?;
                let n = r.count_i16(4, "parameter type count").map_err(&m)?;
                let mut param_types = Vec::with_capacity(n);
                for _ in 0..n {
                    param_types.push(r.u32("parameter type").map_err(&m)?);
                }
                Frontend::Parse {
                    name,
                    sql,
                    param_types,
                }
            }
            b'B' => {
                let m = malformed("Bind");
                let portal = r.cstr("portal name").map_err(&m)?;
                let statement = r.cstr("statement name").map_err(&m)?;
                let formats = read_formats(&mut r, "Bind")?;
                let params = read_values(&mut r, "Bind")?;
                let result_formats = read_formats(&mut r, "Bind")?;
                if formats.len() > 1 && formats.len() != params.len() {
                    return Err(CodecError::Malformed {
                        what: "Bind",
                        source: ReadError::BadCount {
                            what: "parameter format count",
                            value: formats.len() as i64,
                        },
                    });
                }
                Frontend::Bind {
                    portal,
                    statement,
                    formats,
                    params,
                    result_formats,
                }
            }
            b'E' => {
                let m = malformed("Execute");
                Frontend::Execute {
                    portal: r.cstr("portal name").map_err(&m)?,
                    max_rows: r.i32("max rows").map_err(&m)?,
                }
            }
            t @ (b'D' | b'C') => {
                let what = if t == b'D' { "Describe" } else { "Close" };
                let m = malformed(what);
                let kind = r.u8("kind").map_err(&m)?;
                if kind != b'S' && kind != b'P' {
                    return Err(CodecError::Malformed {
                        what,
                        source: ReadError::BadCount {
                            what: "target kind (expected 'S' or 'P')",
                            value: kind as i64,
                        },
                    });
                }
                let name = r.cstr("name").map_err(&m)?;
                if t == b'D' {
                    Frontend::Describe { kind, name }
                } else {
                    Frontend::Close { kind, name }
                }
            }
            b'S' => Frontend::Sync,
            b'H' => Frontend::Flush,
            b'X' => Frontend::Terminate,
            b'c' => Frontend::CopyDone,
            b'd' => {
                let body = r.rest();
                r.take(body.len(), "copy data").map_err(malformed("CopyData"))?;
                Frontend::CopyData(body)
            }
            b'f' => Frontend::CopyFail {
                message: r.cstr("message").map_err(malformed("CopyFail"))?,
            },
            b'F' => {
                let m = malformed("FunctionCall");
                let oid = r.u32("function oid").map_err(&m)?;
                let formats = read_formats(&mut r, "FunctionCall")?;
                let args = read_values(&mut r, "FunctionCall")?;
                let result_format = r.i16("result format").map_err(&m)?;
                Frontend::FunctionCall {
                    oid,
                    formats,
                    args,
                    result_format,
                }
            }
            b'p' => {
                let body = r.rest();
                r.take(body.len(), "password").map_err(malformed("Password"))?;
                Frontend::Password(body)
            }
            t => return Err(CodecError::UnknownTag(t as char)),
        };
        r.finish().map_err(malformed("frontend"))?;
        Ok(msg)
    }
}

/// One field of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    /// Column name.
    pub name: &'a [u8],
    /// Type OID.
    pub type_oid: u32,
    /// Format code.
    pub format: i16,
}

/// The cells of a DataRow, validated at parse time and iterated without allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRow<'a> {
    count: usize,
    body: &'a [u8],
}

impl<'a> DataRow<'a> {
    /// Number of columns.
    pub fn len(&self) -> usize {
        self.count
    }
    /// True when the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The cells; `None` is NULL.
    pub fn cells(&self) -> impl Iterator<Item = Option<&'a [u8]>> + '_ {
        let mut r = Reader::new(self.body);
        (0..self.count).map(move |_| {
            // Validated in `Backend::parse`, so these reads cannot fail; map defensively anyway.
            let len = r.i32("cell length").unwrap_or(-1);
            if len < 0 {
                None
            } else {
                r.take(len as usize, "cell").ok()
            }
        })
    }
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields<'a> {
    /// `(code, value)` pairs, e.g. `(b'C', b"42P01")`.
    pub fields: Vec<(u8, &'a [u8])>,
}

impl ErrorFields<'_> {
    /// A field by its code: `S` severity, `C` SQLSTATE, `M` message, `D` detail, `H` hint.
    pub fn get(&self, code: u8) -> Option<String> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| lossy(v))
    }
}

/// A decoded backend (server) message, borrowing from its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend<'a> {
    /// Authentication request or result; `code` 0 is AuthenticationOk.
    Authentication {
        /// Sub-type: 0 ok, 3 cleartext, 5 md5, 10 SASL, 11 SASL continue, 12 SASL final.
        code: i32,
        /// The rest of the body.
        data: &'a [u8],
    },
    /// A run-time parameter's current value.
    ParameterStatus {
        /// Name.
        name: &'a [u8],
        /// Value.
        value: &'a [u8],
    },
    /// Cancellation key.
    BackendKeyData {
        /// Backend pid.
        pid: i32,
        /// Secret key.
        key: &'a [u8],
    },
    /// Ready for a new query; status `I`, `T` or `E`.
    ReadyForQuery {
        /// Transaction status.
        status: u8,
    },
    /// Result columns.
    RowDescription {
        /// Fields.
        fields: Vec<FieldDescription<'a>>,
    },
    /// One result row.
    DataRow(DataRow<'a>),
    /// A command finished.
    CommandComplete {
        /// Tag, e.g. `SELECT 1`.
        tag: &'a [u8],
    },
    /// The query string was empty.
    EmptyQueryResponse,
    /// An error.
    ErrorResponse(ErrorFields<'a>),
    /// A notice.
    NoticeResponse(ErrorFields<'a>),
    /// Parse succeeded.
    ParseComplete,
    /// Bind succeeded.
    BindComplete,
    /// Close succeeded.
    CloseComplete,
    /// The statement or portal returns no rows.
    NoData,
    /// Execute reached its row limit.
    PortalSuspended,
    /// Parameter types of a described statement.
    ParameterDescription {
        /// OIDs.
        types: Vec<u32>,
    },
    /// LISTEN/NOTIFY delivery.
    NotificationResponse {
        /// Sending backend pid.
        pid: i32,
        /// Channel.
        channel: &'a [u8],
        /// Payload.
        payload: &'a [u8],
    },
    /// Server awaits COPY data.
    CopyInResponse,
    /// Server will send COPY data.
    CopyOutResponse,
    /// Streaming replication copy.
    CopyBothResponse,
    /// COPY TO STDOUT data.
    CopyData(&'a [u8]),
    /// End of COPY TO STDOUT.
    CopyDone,
    /// Fast-path result.
    FunctionCallResponse(Option<&'a [u8]>),
    /// The server does not support a requested minor version or option.
    NegotiateProtocolVersion,
}

impl<'a> Backend<'a> {
    /// Decodes a frame from the server.
    pub fn parse(frame: &'a Frame) -> Result<Self, CodecError> {
        let mut r = Reader::new(frame.body());
        let msg = match frame.tag() {
            b'R' => {
                let code = r.i32("auth code").map_err(malformed("Authentication"))?;
                let data = r.rest();
                r.take(data.len(), "auth data").map_err(malformed("Authentication"))?;
                Backend::Authentication { code, data }
            }
            b'S' => {
                let m = malformed("ParameterStatus");
                Backend::ParameterStatus {
                    name: r.cstr("name").map_err(&m)?,
                    value: r.cstr("value").map_err(&m)?,
                }
            }
            b'K' => {
                let pid = r.i32("pid").map_err(malformed("BackendKeyData"))?;
                let key = r.rest();
                r.take(key.len(), "key").map_err(malformed("BackendKeyData"))?;
                Backend::BackendKeyData { pid, key }
            }
            b'Z' => Backend::ReadyForQuery {
                status: r.u8("status").map_err(malformed("ReadyForQuery"))?,
            },
            b'T' => {
                let m = malformed("RowDescription");
                let n = r.count_i16(19, "field count").map_err(&m)?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.cstr("field name").map_err(&m)?;
                    let _table = r.u32("table oid").map_err(&m)?;
                    let _col = r.i16("column").map_err(&m)?;
                    let type_oid = r.u32("type oid").map_err(&m)?;
                    let _size = r.i16("type size").map_err(&m)?;
                    let _modifier = r.i32("type modifier").map_err(&m)?;
                    let format = r.i16("format").map_err(&m)?;
                    fields.push(FieldDescription {
                        name,
                        type_oid,
                        format,
                    });
                }
                Backend::RowDescription { fields }
            }
            b'D' => {
                let m = malformed("DataRow");
                let count = r.count_i16(4, "column count").map_err(&m)?;
                let body = r.rest();
                for _ in 0..count {
                    let len = r.i32("cell length").map_err(&m)?;
                    if len >= 0 {
                        r.take(len as usize, "cell").map_err(&m)?;
                    } else if len != -1 {
                        return Err(CodecError::Malformed {
                            what: "DataRow",
                            source: ReadError::BadCount {
                                what: "cell length",
                                value: len as i64,
                            },
                        });
                    }
                }
                Backend::DataRow(DataRow { count, body })
            }
            b'C' => Backend::CommandComplete {
                tag: r.cstr("tag").map_err(malformed("CommandComplete"))?,
            },
            b'I' => Backend::EmptyQueryResponse,
            t @ (b'E' | b'N') => {
                let what = if t == b'E' { "ErrorResponse" } else { "NoticeResponse" };
                let m = malformed(what);
                let mut fields = Vec::new();
                loop {
                    let code = r.u8("field code").map_err(&m)?;
                    if code == 0 {
                        break;
                    }
                    fields.push((code, r.cstr("field value").map_err(&m)?));
                }
                let f = ErrorFields { fields };
                if t == b'E' {
                    Backend::ErrorResponse(f)
                } else {
                    Backend::NoticeResponse(f)
                }
            }
            b'1' => Backend::ParseComplete,
            b'2' => Backend::BindComplete,
            b'3' => Backend::CloseComplete,
            b'n' => Backend::NoData,
            b's' => Backend::PortalSuspended,
            b't' => {
                let m = malformed("ParameterDescription");
                let n = r.count_i16(4, "parameter count").map_err(&m)?;
                let mut types = Vec::with_capacity(n);
                for _ in 0..n {
                    types.push(r.u32("type").map_err(&m)?);
                }
                Backend::ParameterDescription { types }
            }
            b'A' => {
                let m = malformed("NotificationResponse");
                Backend::NotificationResponse {
                    pid: r.i32("pid").map_err(&m)?,
                    channel: r.cstr("channel").map_err(&m)?,
                    payload: r.cstr("payload").map_err(&m)?,
                }
            }
            t @ (b'G' | b'H' | b'W') => {
                let what = "CopyResponse";
                let m = malformed(what);
                let _overall = r.u8("format").map_err(&m)?;
                let n = r.count_i16(2, "column count").map_err(&m)?;
                for _ in 0..n {
                    r.i16("column format").map_err(&m)?;
                }
                match t {
                    b'G' => Backend::CopyInResponse,
                    b'H' => Backend::CopyOutResponse,
                    _ => Backend::CopyBothResponse,
                }
            }
            b'd' => {
                let body = r.rest();
                r.take(body.len(), "copy data").map_err(malformed("CopyData"))?;
                Backend::CopyData(body)
            }
            b'c' => Backend::CopyDone,
            b'V' => {
                let m = malformed("FunctionCallResponse");
                let len = r.i32("result length").map_err(&m)?;
                let v = if len < 0 {
                    None
                } else {
                    Some(r.take(len as usize, "result").map_err(&m)?)
                };
                Backend::FunctionCallResponse(v)
            }
            b'v' => {
                let body = r.rest();
                r.take(body.len(), "negotiate").map_err(malformed("NegotiateProtocolVersion"))?;
                Backend::NegotiateProtocolVersion
            }
            t => return Err(CodecError::UnknownTag(t as char)),
        };
        r.finish().map_err(malformed("backend"))?;
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------------------
// Encoding. Lengths are written through `write_body`, which fills a placeholder with an
// overflow-checked length.

/// A message body grew past what a u32 length can describe.
#[derive(Debug, Error)]
#[error("message body too large to encode")]
pub struct EncodeError;

/// Writes `tag` (if any), a length placeholder, the body from `f`, then the real length.
pub fn write_body<F>(buf: &mut BytesMut, tag: Option<u8>, f: F) -> Result<(), EncodeError>
where
    F: FnOnce(&mut BytesMut),
{
    if let Some(t) = tag {
        buf.put_u8(t);
    }
    let base = buf.len();
    buf.put_u32(0);
    f(buf);
    let len = u32::try_from(buf.len() - base).map_err(|_| EncodeError)?;
    buf[base..base + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    // A NUL inside would end the string early on the other side; drop them.
    buf.extend(s.iter().copied().filter(|&b| b != 0));
    buf.put_u8(0);
}

/// An ErrorResponse (or NoticeResponse with `notice`) with severity, SQLSTATE and message.
pub fn error_response(severity: &str, sqlstate: &str, message: &str, hint: Option<&str>) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, Some(b'E'), |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_bytes());
        b.put_u8(b'V');
        put_cstr(b, severity.as_bytes());
        b.put_u8(b'C');
        put_cstr(b, sqlstate.as_bytes());
        b.put_u8(b'M');
        put_cstr(b, message.as_bytes());
        if let Some(h) = hint {
            b.put_u8(b'H');
            put_cstr(b, h.as_bytes());
        }
        b.put_u8(0);
    });
    buf.freeze()
}

/// AuthenticationOk.
pub fn authentication_ok() -> Bytes {
    Bytes::from_static(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0])
}

/// A startup message with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, None, |b| {
        b.put_u32(PROTOCOL_3_0);
        for (k, v) in params {
            put_cstr(b, k.as_bytes());
            put_cstr(b, v.as_bytes());
        }
        b.put_u8(0);
    });
    buf.freeze()
}

/// SSLRequest packet.
pub fn ssl_request() -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, None, |b| b.put_u32(SSL_REQUEST));
    buf.freeze()
}

/// CancelRequest packet.
pub fn cancel_request(pid: i32, key: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, None, |b| {
        b.put_u32(CANCEL_REQUEST);
        b.put_i32(pid);
        b.put_slice(key);
    });
    buf.freeze()
}

/// A `p` message carrying `data` (password, SASL initial response or SASL response).
pub fn password_message(data: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, Some(b'p'), |b| b.put_slice(data));
    buf.freeze()
}

/// SASLInitialResponse for `mechanism`.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = write_body(&mut buf, Some(b'p'), |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
    buf.freeze()
}

/// Terminate.
pub fn terminate() -> Bytes {
    Bytes::from_static(&[b'X', 0, 0, 0, 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(side: Side, bytes: &[u8]) -> Frame {
        let mut b = BytesMut::from(bytes);
        let f = decode_frame(&mut b, side, 1 << 20).unwrap().unwrap();
        assert!(b.is_empty());
        f
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decodes_bind_with_text_binary_and_null() {
        let mut body = Vec::new();
        body.extend_from_slice(b"p1\0s1\0");
        body.extend_from_slice(&[0, 2, 0, 0, 0, 1]); // formats: text, binary
        body.extend_from_slice(&[0, 2]); // 2 params... then a third? no: 2
        body.extend_from_slice(&[0, 0, 0, 2]);
        body.extend_from_slice(b"42");
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
        body.extend_from_slice(&[0, 0]); // result formats
        let f = frame(Side::Frontend, &msg(b'B', &body));
        match Frontend::parse(&f).unwrap() {
            Frontend::Bind {
                portal,
                statement,
                formats,
                params,
                ..
            } => {
                assert_eq!(portal, b"p1");
                assert_eq!(statement, b"s1");
                assert_eq!(formats, vec![0, 1]);
                assert_eq!(params, vec![Some(&b"42"[..]), None]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_and_undersized_frames_are_rejected_before_buffering() {
        let mut b = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        let err = decode_frame(&mut b, Side::Frontend, 1 << 20).unwrap_err();
        assert_eq!(err.sqlstate(), "54000");
        assert!(b.capacity() < 1 << 20);
        let mut b = BytesMut::from(&[b'S', 0, 0, 0, 9][..]);
        assert!(matches!(
            decode_frame(&mut b, Side::Frontend, 1 << 20),
            Err(CodecError::BadLength { tag: 'S', .. })
        ));
        let mut b = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(decode_frame(&mut b, Side::Frontend, 1 << 20).is_err());
        let mut b = BytesMut::from(&b"\x00garbage"[..]);
        assert!(matches!(
            decode_frame(&mut b, Side::Frontend, 1 << 20),
            Err(CodecError::UnknownTag('\0'))
        ));
    }

    #[test]
    fn bind_with_huge_param_count_is_malformed_not_allocated() {
        let mut body = Vec::new();
        body.extend_from_slice(b"\0\0");
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&[0x7f, 0xff]); // 32767 params, no bytes follow
        let f = frame(Side::Frontend, &msg(b'B', &body));
        assert!(matches!(
            Frontend::parse(&f),
            Err(CodecError::Malformed { what: "Bind", .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let f = frame(Side::Frontend, &msg(b'Q', b"select 1\0xx"));
        assert!(matches!(
            Frontend::parse(&f),
            Err(CodecError::Malformed {
                source: ReadError::Trailing(2),
                ..
            })
        ));
    }

    #[test]
    fn startup_packets() {
        let sm = startup_message(&[("user", "alice"), ("database", "db")]);
        let mut b = BytesMut::from(&sm[..]);
        let s = decode_startup(&mut b).unwrap().unwrap();
        assert_eq!(s.param("user"), Some("alice"));
        assert_eq!(s.param("database"), Some("db"));
        let mut b = BytesMut::from(&ssl_request()[..]);
        assert_eq!(decode_startup(&mut b).unwrap(), Some(Startup::SslRequest));
        let mut b = BytesMut::from(&cancel_request(7, &[1, 2, 3, 4])[..]);
        assert!(matches!(
            decode_startup(&mut b).unwrap(),
            Some(Startup::Cancel { pid: 7, .. })
        ));
        let mut b = BytesMut::from(&[0, 1, 0, 0][..]);
        assert!(matches!(
            decode_startup(&mut b),
            Err(CodecError::BadStartupLength(65536))
        ));
        let mut b = BytesMut::from(&[0, 0, 0, 8, 0, 2, 0, 0][..]);
        assert!(matches!(
            decode_startup(&mut b),
            Err(CodecError::UnsupportedVersion { major: 2, minor: 0 })
        ));
    }

    #[test]
    fn data_row_cells() {
        let mut body = vec![0, 3];
        body.extend_from_slice(&[0, 0, 0, 1, b'a']);
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        body.extend_from_slice(&[0, 0, 0, 0]);
        let f = frame(Side::Backend, &msg(b'D', &body));
        let Backend::DataRow(row) = Backend::parse(&f).unwrap() else {
            panic!()
        };
        let cells: Vec<_> = row.cells().collect();
        assert_eq!(cells, vec![Some(&b"a"[..]), None, Some(&b""[..])]);
        // a cell longer than the frame
        let f = frame(Side::Backend, &msg(b'D', &[0, 1, 0, 0, 0, 9, b'x']));
        assert!(Backend::parse(&f).is_err());
    }

    #[test]
    fn error_response_round_trip() {
        let e = error_response("FATAL", "28000", "no\0pe", Some("run custody login"));
        let f = frame(Side::Backend, &e);
        let Backend::ErrorResponse(fields) = Backend::parse(&f).unwrap() else {
            panic!()
        };
        assert_eq!(fields.get(b'C').as_deref(), Some("28000"));
        assert_eq!(fields.get(b'M').as_deref(), Some("nope"));
        assert_eq!(fields.get(b'H').as_deref(), Some("run custody login"));
    }
}
