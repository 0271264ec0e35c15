//! Renders Bind / FunctionCall parameter values for the record: text values as sent, binary
//! values of common types decoded to their text form, anything else kept as raw bytes.
//! Every value is cut at the recorder's byte limit and the cut is counted.

use custody_proto::pb::v1::Param;

/// Well-known type OIDs.
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

fn cut(bytes: &[u8], limit: usize) -> (&[u8], u64) {
    if bytes.len() > limit {
        (&bytes[..limit], (bytes.len() - limit) as u64)
    } else {
        (bytes, 0)
    }
}

/// Text of a binary value of a known type, or None.
fn binary_as_text(oid: u32, v: &[u8]) -> Option<String> {
    let arr = |n: usize| -> Option<&[u8]> { if v.len() == n { Some(v) } else { None } };
    Some(match oid {
        oid::BOOL => match arr(1)?[0] {
            0 => "f".into(),
            _ => "t".into(),
        },
        oid::INT2 => i16::from_be_bytes(arr(2)?.try_into().ok()?).to_string(),
        oid::INT4 => i32::from_be_bytes(arr(4)?.try_into().ok()?).to_string(),
        oid::OID => u32::from_be_bytes(arr(4)?.try_into().ok()?).to_string(),
        oid::INT8 => i64::from_be_bytes(arr(8)?.try_into().ok()?).to_string(),
        oid::FLOAT4 => f32::from_be_bytes(arr(4)?.try_into().ok()?).to_string(),
        oid::FLOAT8 => f64::from_be_bytes(arr(8)?.try_into().ok()?).to_string(),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::JSON => {
            std::str::from_utf8(v).ok()?.to_string()
        }
        oid::JSONB => {
            let (ver, rest) = v.split_first()?;
            if *ver != 1 {
                return None;
            }
            std::str::from_utf8(rest).ok()?.to_string()
        }
        oid::UUID => {
            let b = arr(16)?;
            let h = hex::encode(b);
            format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
        }
        oid::DATE => {
            let days = i32::from_be_bytes(arr(4)?.try_into().ok()?);
            let d = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?
                .checked_add_signed(chrono::Duration::days(days as i64))?;
            d.to_string()
        }
        oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            let us = i64::from_be_bytes(arr(8)?.try_into().ok()?);
            let secs = PG_EPOCH_UNIX_SECS.checked_add(us.div_euclid(1_000_000))?;
            let nanos = (us.rem_euclid(1_000_000) * 1000) as u32;
            let t = chrono::DateTime::from_timestamp(secs, nanos)?;
            if oid == oid::TIMESTAMPTZ {
                t.to_rfc3339()
            } else {
                t.naive_utc().to_string()
            }
        }
        _ => return None,
    })
}

/// Renders one parameter.
pub fn render(value: Option<&[u8]>, format: i16, type_oid: u32, limit: usize) -> Param {
    let mut p = Param {
        format: format.max(0) as u32,
        type_oid,
        ..Default::default()
    };
    let Some(v) = value else {
        p.is_null = true;
        return p;
    };
    // Binary text-like values are the text's bytes: cut them as text, not as raw bytes.
    let text_like = matches!(type_oid, oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::JSON);
    if format == 0 || (text_like && std::str::from_utf8(&v[..v.len().min(limit)]).is_ok()) {
        let (kept, dropped) = cut(v, limit);
        p.text = String::from_utf8_lossy(kept).into_owned();
        p.truncated_bytes = dropped;
    } else if type_oid == oid::BYTEA {
        let (kept, dropped) = cut(v, limit);
        p.raw = kept.to_vec();
        p.truncated_bytes = dropped;
    } else if let Some(t) = binary_as_text(type_oid, v).filter(|t| t.len() <= limit) {
        p.text = t;
    } else {
        let (kept, dropped) = cut(v, limit);
        p.raw = kept.to_vec();
        p.truncated_bytes = dropped;
    }
    p
}

/// The format code for parameter `i` given a Bind's format list.
pub fn format_for(formats: &[i16], i: usize) -> i16 {
    match formats.len() {
        0 => 0,
        1 => formats[0],
        _ => formats.get(i).copied().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_common_binary_types() {
        assert_eq!(render(Some(&42i32.to_be_bytes()), 1, oid::INT4, 100).text, "42");
        assert_eq!(render(Some(&(-7i64).to_be_bytes()), 1, oid::INT8, 100).text, "-7");
        assert_eq!(render(Some(&[1]), 1, oid::BOOL, 100).text, "t");
        let u = render(Some(&[0x12; 16]), 1, oid::UUID, 100);
        assert_eq!(u.text, "12121212-1212-1212-1212-121212121212");
        assert_eq!(render(Some(&0i64.to_be_bytes()), 1, oid::TIMESTAMPTZ, 100).text, "2000-01-01T00:00:00+00:00");
        assert_eq!(render(Some(&0i32.to_be_bytes()), 1, oid::DATE, 100).text, "2000-01-01");
    }

    #[test]
    fn unknown_or_malformed_binary_is_kept_raw_and_null_is_null() {
        let p = render(Some(&[1, 2, 3]), 1, oid::INT4, 100);
        assert!(p.text.is_empty());
        assert_eq!(p.raw, vec![1, 2, 3]);
        assert!(render(None, 0, 0, 100).is_null);
    }

    #[test]
    fn values_are_cut_at_the_limit_and_the_cut_is_counted() {
        let p = render(Some(&[b'x'; 100]), 0, 0, 10);
        assert_eq!(p.text.len(), 10);
        assert_eq!(p.truncated_bytes, 90);
    }
}
