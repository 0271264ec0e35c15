//! A bounded reader over a byte slice. Every read checks the bytes remaining first, so a
//! length or count taken off the wire can never cause an out-of-bounds access or a large
//! allocation.

use thiserror::Error;

/// Why a bounded read failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The input ended before a field was complete.
    #[error("message truncated: needed {needed} more bytes for {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A C string had no terminating NUL.
    #[error("missing NUL terminator in {0}")]
    Unterminated(&'static str),
    /// Bytes were left after the last field.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// A count or length field was negative or larger than the bytes that follow.
    #[error("invalid {what}: {value}")]
    BadCount {
        /// The field.
        what: &'static str,
        /// Its value.
        value: i64,
    },
}

/// Reads fields off a slice, front to back.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Wraps `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The unread bytes, without consuming them.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ReadError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(ReadError::Truncated {
                what,
                needed: n - self.buf.len(),
            }),
        }
    }

    /// A sub-reader over the next `n` bytes.
    pub fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, ReadError> {
        self.take(n, what).map(Reader::new)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, ReadError> {
        Ok(self.take(1, what)?[0])
    }

    /// Big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, ReadError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Big-endian i16.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, ReadError> {
        Ok(self.u16(what)? as i16)
    }

    /// Big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ReadError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Big-endian i32.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, ReadError> {
        Ok(self.u32(what)? as i32)
    }

    /// Big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, ReadError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A NUL-terminated string; returns the bytes before the NUL.
    pub fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], ReadError> {
        let pos = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ReadError::Unterminated(what))?;
        let s = self.take(pos, what)?;
        self.take(1, what)?;
        Ok(s)
    }

    /// A count of items that each take at least `min_item` bytes. Rejects negative counts and
    /// counts the remaining bytes cannot hold, so the result is safe to allocate for.
    pub fn count_i16(&mut self, min_item: usize, what: &'static str) -> Result<usize, ReadError> {
        let n = self.i16(what)?;
        self.check_count(n as i64, min_item, what)
    }

    /// As [`Reader::count_i16`], for a 32-bit count.
    pub fn count_i32(&mut self, min_item: usize, what: &'static str) -> Result<usize, ReadError> {
        let n = self.i32(what)?;
        self.check_count(n as i64, min_item, what)
    }

    fn check_count(&self, n: i64, min_item: usize, what: &'static str) -> Result<usize, ReadError> {
        if n < 0 {
            return Err(ReadError::BadCount { what, value: n });
        }
        let n = n as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(ReadError::BadCount {
                what,
                value: n as i64,
            });
        }
        Ok(n)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), ReadError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ReadError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_past_end_is_an_error_not_a_panic() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.take(5, "x"),
            Err(ReadError::Truncated {
                what: "x",
                needed: 2
            })
        );
        assert_eq!(r.remaining(), 3, "a failed take consumes nothing");
    }

    #[test]
    fn counts_larger_than_the_input_are_refused_before_allocation() {
        // claims 30000 items of at least 4 bytes in a 6-byte buffer
        let mut r = Reader::new(&[0x75, 0x30, 0, 0, 0, 0]);
        assert!(matches!(
            r.count_i16(4, "params"),
            Err(ReadError::BadCount { .. })
        ));
        let mut r = Reader::new(&[0xff, 0xff]);
        assert!(matches!(
            r.count_i16(0, "params"),
            Err(ReadError::BadCount { value: -1, .. })
        ));
    }

    #[test]
    fn cstr_requires_terminator() {
        let mut r = Reader::new(b"abc\0def");
        assert_eq!(r.cstr("a").unwrap(), b"abc");
        assert_eq!(r.cstr("b"), Err(ReadError::Unterminated("b")));
        assert_eq!(r.finish(), Err(ReadError::Trailing(3)));
    }
}
