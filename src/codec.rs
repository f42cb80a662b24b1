//! Little-endian binary encoding shared by everything Vigil puts on the wire or in the
//! log: a bounds-checked [`Reader`] that never panics and names the field and offset of
//! whatever it could not read, and `put_*` helpers for writing.

use std::fmt;

/// What could not be decoded, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The field being read, e.g. "kv_put.key".
    pub field: &'static str,
    /// Byte offset of the field within the decoded buffer.
    pub offset: usize,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The buffer ended `needed` bytes too early.
    Truncated { needed: usize },
    /// A length prefix exceeds the field's limit.
    TooLong { len: u64, max: usize },
    /// A tag or value outside the known set.
    Invalid(String),
    /// Bytes left over after a complete value.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}: ", self.field, self.offset)?;
        match &self.problem {
            Problem::Truncated { needed } => write!(f, "truncated ({needed} more bytes needed)"),
            Problem::TooLong { len, max } => write!(f, "length {len} exceeds the limit of {max}"),
            Problem::Invalid(why) => write!(f, "{why}"),
            Problem::TrailingBytes(n) => write!(f, "{n} unexpected trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A cursor over bytes being decoded.
pub struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, offset: 0 }
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    /// An error about `field` at the current offset.
    pub fn invalid(&self, field: &'static str, why: impl Into<String>) -> DecodeError {
        DecodeError {
            field,
            offset: self.offset,
            problem: Problem::Invalid(why.into()),
        }
    }

    pub fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError {
                field,
                offset: self.offset,
                problem: Problem::Truncated {
                    needed: len - self.remaining(),
                },
            });
        }
        let slice = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let at = self.offset;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError {
                field,
                offset: at,
                problem: Problem::Invalid(format!("boolean byte {other} is neither 0 nor 1")),
            }),
        }
    }

    /// A u32 length prefix, then that many bytes; the length is checked against `max`
    /// before anything else so a hostile prefix cannot cause a large allocation.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let at = self.offset;
        let len = self.u32(field)?;
        if len as usize > max {
            return Err(DecodeError {
                field,
                offset: at,
                problem: Problem::TooLong {
                    len: len as u64,
                    max,
                },
            });
        }
        self.take(field, len as usize)
    }

    /// Like [`Reader::bytes`], and the bytes must be UTF-8.
    pub fn str(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let at = self.offset;
        let bytes = self.bytes(field, max)?;
        std::str::from_utf8(bytes).map_err(|e| DecodeError {
            field,
            offset: at + 4 + e.valid_up_to(),
            problem: Problem::Invalid("not UTF-8".into()),
        })
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self, field: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError {
                field,
                offset: self.offset,
                problem: Problem::TrailingBytes(n),
            }),
        }
    }
}

pub fn put_u8(out: &mut Vec<u8>, value: u8) {
    out.push(value);
}

pub fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub fn put_bool(out: &mut Vec<u8>, value: bool) {
    out.push(value as u8);
}

/// A u32 length prefix and the bytes. Lengths are bounded far below 4 GiB by `limits`.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("encoded field over 4 GiB");
    put_u32(out, len);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_field_and_offset() {
        let mut out = Vec::new();
        put_u8(&mut out, 7);
        put_u64(&mut out, u64::MAX - 1);
        put_bytes(&mut out, b"key");
        put_bool(&mut out, true);
        let mut r = Reader::new(&out);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u64("b").unwrap(), u64::MAX - 1);
        assert_eq!(r.str("c", 8).unwrap(), "key");
        assert!(r.bool("d").unwrap());
        r.finish("end").unwrap();

        let mut r = Reader::new(&out);
        r.u8("a").unwrap();
        r.u64("b").unwrap();
        let error = r.bytes("c", 2).unwrap_err();
        assert_eq!(error.offset, 9);
        assert_eq!(error.problem, Problem::TooLong { len: 3, max: 2 });
        assert_eq!(
            error.to_string(),
            "c at byte 9: length 3 exceeds the limit of 2"
        );

        let error = Reader::new(&out[..5]).u64("b").unwrap_err();
        assert_eq!(error.problem, Problem::Truncated { needed: 3 });
        let error = Reader::new(&[2]).bool("flag").unwrap_err();
        assert!(error.to_string().contains("neither 0 nor 1"));
        let mut r = Reader::new(&[1, 2]);
        r.u8("x").unwrap();
        assert_eq!(
            r.finish("x").unwrap_err().problem,
            Problem::TrailingBytes(1)
        );
    }
}
