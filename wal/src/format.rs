//! The on-disk format of WAL segments, in one place. Version 1.
//!
//! A segment is one fixed-size file named `{seq:016x}.seg`, preallocated and mapped.
//!
//! ```text
//! segment file (segment_bytes long, all integers little-endian)
//! +-------------------------------+  offset 0
//! | segment header (64 bytes)     |
//! |   0  magic "VIGILWAL"   [8]   |
//! |   8  format version     u32   |  = FORMAT_VERSION
//! |  12  data_offset        u32   |  where the first record starts (multiple of 8)
//! |  16  segment seq        u64   |  = the number in the file name
//! |  24  first_index        u64   |  Raft index the first entry of this segment has
//! |  32  segment_bytes      u64   |  = the file's length
//! |  40  reserved (zero)    [20]  |
//! |  60  header crc32       u32   |  crc32 of bytes 0..60
//! +-------------------------------+
//! | zero up to data_offset        |
//! +-------------------------------+  data_offset
//! | record | record | ... | Seal  |  each record starts at a multiple of 8
//! +-------------------------------+
//! | zeroes (never written)        |
//! +-------------------------------+  segment_bytes
//!
//! record (40-byte header, payload, zero padding to a multiple of 8)
//!  0      4      8            16           24     28     32            40
//!  +------+------+------------+------------+------+------+-------------+--------- - -+
//!  | hcrc | len  |   index    |   term     | kind | pcrc |  synced_to  | payload...  |
//!  +------+------+------------+------------+------+------+-------------+--------- - -+
//!  hcrc      crc32(seq_le ++ header bytes 4..40)    (covers len, index, term, kind, pcrc)
//!  pcrc      crc32(seq_le ++ index_le ++ payload)
//!  kind      1 Entry, 2 Truncate (entries >= index are removed), 3 Compact (entries
//!            < index are dropped), 4 Seal (the segment ends here)
//!  synced_to the log position (seq << 32 | offset) up to which the writer knew the log
//!            to be durable when it wrote this record
//! ```
//!
//! Why the fields:
//! - The segment sequence number is mixed into both checksums, so a record left over in a
//!   reused or recycled file (other seq) never validates as a record of this segment.
//! - The header has its own CRC so a torn payload (header valid, payload CRC wrong) is told
//!   apart from a bad header (whose length cannot be trusted).
//! - `synced_to` tells a torn tail from corruption. After a crash, everything after the
//!   last completed sync may be torn in any pattern (pages reach the disk in any order).
//!   A bad record at position P is corruption exactly when some later valid record claims
//!   that the log was durable beyond P: that data was synced, then damaged. Otherwise it
//!   lies in the unsynced tail, and the log is cut there.
//!
//! Everything in this module is pure: parsing works on byte slices, never panics on any
//! input, never allocates, and every loop advances by at least 8 bytes.

/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"VIGILWAL";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header structure (the reserved area may be larger).
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 40;
/// Records start at multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// The most framing bytes one record adds to its payload (header plus padding).
pub const MAX_RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + RECORD_ALIGN - 1;
/// Smallest segment the format allows (header area plus some records).
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest segment: record offsets and `synced_to` positions hold offsets in 32 bits.
pub const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64 + 1 - 4096;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A Raft log entry.
    Entry = 1,
    /// Entries with index >= `index` are removed (a Raft conflict).
    Truncate = 2,
    /// Entries with index < `index` are dropped (after a snapshot).
    Compact = 3,
    /// The segment ends here; the log continues in the next segment.
    Seal = 4,
}

impl RecordKind {
    fn from_u32(value: u32) -> Option<RecordKind> {
        match value {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::Truncate),
            3 => Some(RecordKind::Compact),
            4 => Some(RecordKind::Seal),
            _ => None,
        }
    }
}

/// A log position: segment sequence in the high 32 bits, byte offset in the low 32.
pub fn position(seq: u64, offset: u64) -> u64 {
    debug_assert!(offset <= u32::MAX as u64);
    (seq << 32) | offset
}

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub first_index: u64,
    pub segment_bytes: u64,
    pub data_offset: u32,
}

/// Why a segment header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    TooShort,
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u32),
    BadDataOffset(u32),
    BadSegmentBytes(u64),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::TooShort => write!(f, "segment header: file shorter than the header"),
            HeaderError::BadMagic => write!(f, "segment header: bad magic"),
            HeaderError::BadChecksum => write!(f, "segment header: checksum mismatch"),
            HeaderError::UnsupportedVersion(v) => {
                write!(f, "segment header: unsupported format version {v}")
            }
            HeaderError::BadDataOffset(o) => write!(f, "segment header: bad data_offset {o}"),
            HeaderError::BadSegmentBytes(n) => write!(f, "segment header: bad segment_bytes {n}"),
        }
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Encodes a segment header into `out[..SEGMENT_HEADER_LEN]`.
pub fn encode_segment_header(out: &mut [u8], header: &SegmentHeader) {
    assert!(out.len() >= SEGMENT_HEADER_LEN);
    let out = &mut out[..SEGMENT_HEADER_LEN];
    out.fill(0);
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&header.data_offset.to_le_bytes());
    out[16..24].copy_from_slice(&header.seq.to_le_bytes());
    out[24..32].copy_from_slice(&header.first_index.to_le_bytes());
    out[32..40].copy_from_slice(&header.segment_bytes.to_le_bytes());
    let crc = crc32fast::hash(&out[0..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes and checks a segment header from the start of a segment's bytes.
pub fn decode_segment_header(buf: &[u8]) -> Result<SegmentHeader, HeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::TooShort);
    }
    if buf[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if crc32fast::hash(&buf[0..60]) != u32_at(buf, 60) {
        return Err(HeaderError::BadChecksum);
    }
    let version = u32_at(buf, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let header = SegmentHeader {
        data_offset: u32_at(buf, 12),
        seq: u64_at(buf, 16),
        first_index: u64_at(buf, 24),
        segment_bytes: u64_at(buf, 32),
    };
    if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&header.segment_bytes) {
        return Err(HeaderError::BadSegmentBytes(header.segment_bytes));
    }
    let data_offset = header.data_offset as u64;
    if data_offset < SEGMENT_HEADER_LEN as u64
        || data_offset % RECORD_ALIGN as u64 != 0
        || data_offset + (RECORD_HEADER_LEN as u64) * 2 > header.segment_bytes
    {
        return Err(HeaderError::BadDataOffset(header.data_offset));
    }
    Ok(header)
}

/// Bytes a record with `payload_len` payload bytes takes, padding included.
pub fn record_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
}

/// The fields of a record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub index: u64,
    pub term: u64,
    pub synced_to: u64,
}

/// The header bytes of a record with this payload, both checksums computed.
pub fn encode_record_header(
    seq: u64,
    header: &RecordHeader,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    assert!(payload.len() <= u32::MAX as usize);
    let mut pcrc = crc32fast::Hasher::new();
    pcrc.update(&seq.to_le_bytes());
    pcrc.update(&header.index.to_le_bytes());
    pcrc.update(payload);
    let mut head = [0u8; RECORD_HEADER_LEN];
    head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[8..16].copy_from_slice(&header.index.to_le_bytes());
    head[16..24].copy_from_slice(&header.term.to_le_bytes());
    head[24..28].copy_from_slice(&(header.kind as u32).to_le_bytes());
    head[28..32].copy_from_slice(&pcrc.finalize().to_le_bytes());
    head[32..40].copy_from_slice(&header.synced_to.to_le_bytes());
    let hcrc = header_crc(seq, &head);
    head[0..4].copy_from_slice(&hcrc.to_le_bytes());
    head
}

/// Writes one record (header, payload, zero padding) at the start of `out`, which must
/// hold `record_len(payload.len())` bytes. Returns the bytes written.
pub fn encode_record(out: &mut [u8], seq: u64, header: &RecordHeader, payload: &[u8]) -> usize {
    let len = record_len(payload.len());
    assert!(out.len() >= len, "record does not fit");
    let out = &mut out[..len];
    out[..RECORD_HEADER_LEN].copy_from_slice(&encode_record_header(seq, header, payload));
    out[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload.len()].copy_from_slice(payload);
    out[RECORD_HEADER_LEN + payload.len()..].fill(0);
    len
}

fn header_crc(seq: u64, head: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&head[4..RECORD_HEADER_LEN]);
    h.finalize()
}

/// A valid record found in a segment; `payload` borrows the segment bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Byte offset of the record in the segment.
    pub offset: usize,
    /// Bytes the record takes, padding included.
    pub len: usize,
    pub header: RecordHeader,
    pub payload: &'a [u8],
}

/// Why a record at some offset is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than a record header remain.
    Truncated,
    /// The 40 header bytes are all zero: nothing was written here.
    Zero,
    /// The header checksum does not match.
    BadHeaderChecksum,
    /// The header is valid but names an unknown kind.
    BadKind(u32),
    /// The header is valid but its length runs past the end of the segment.
    BadLength(u32),
    /// The header is valid but the payload checksum does not match (torn payload).
    BadPayloadChecksum,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => write!(f, "record header runs past the segment end"),
            RecordError::Zero => write!(f, "no record (zero bytes)"),
            RecordError::BadHeaderChecksum => write!(f, "record header checksum mismatch"),
            RecordError::BadKind(k) => write!(f, "record kind {k} unknown"),
            RecordError::BadLength(l) => write!(f, "record length {l} runs past the segment end"),
            RecordError::BadPayloadChecksum => write!(f, "record payload checksum mismatch"),
        }
    }
}

/// Decodes and checks the record at `offset` of a segment with sequence `seq`.
pub fn decode_record(buf: &[u8], seq: u64, offset: usize) -> Result<RecordView<'_>, RecordError> {
    let Some(head) = buf.get(offset..offset.saturating_add(RECORD_HEADER_LEN)) else {
        return Err(RecordError::Truncated);
    };
    if head.iter().all(|&b| b == 0) {
        return Err(RecordError::Zero);
    }
    if header_crc(seq, head) != u32_at(head, 0) {
        return Err(RecordError::BadHeaderChecksum);
    }
    let payload_len = u32_at(head, 4);
    let kind_raw = u32_at(head, 24);
    let Some(kind) = RecordKind::from_u32(kind_raw) else {
        return Err(RecordError::BadKind(kind_raw));
    };
    let len = record_len(payload_len as usize);
    let Some(record) = buf.get(offset..offset.saturating_add(len)) else {
        return Err(RecordError::BadLength(payload_len));
    };
    let index = u64_at(head, 8);
    let payload = &record[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len as usize];
    let mut pcrc = crc32fast::Hasher::new();
    pcrc.update(&seq.to_le_bytes());
    pcrc.update(&index.to_le_bytes());
    pcrc.update(payload);
    if pcrc.finalize() != u32_at(head, 28) {
        return Err(RecordError::BadPayloadChecksum);
    }
    Ok(RecordView {
        offset,
        len,
        header: RecordHeader {
            kind,
            index,
            term: u64_at(head, 16),
            synced_to: u64_at(head, 32),
        },
        payload,
    })
}

/// Reads the header fields of a record this process wrote or already validated, without
/// checking checksums (the read path). Returns None if the bytes are out of range.
pub fn peek_record(buf: &[u8], offset: usize) -> Option<(u64, u64, &[u8])> {
    let head = buf.get(offset..offset.checked_add(RECORD_HEADER_LEN)?)?;
    let payload_len = u32_at(head, 4) as usize;
    let start = offset + RECORD_HEADER_LEN;
    let payload = buf.get(start..start.checked_add(payload_len)?)?;
    Some((u64_at(head, 8), u64_at(head, 16), payload))
}

/// How a sequential scan of a segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// A Seal record at this offset closed the segment.
    Sealed { offset: usize },
    /// No valid record at this offset (zeroes, a torn or a corrupt record).
    Stopped { offset: usize, why: RecordError },
}

/// Walks the records of one segment in order, yielding each valid record, and stops at
/// the first offset that holds no valid record or after a Seal. Never panics, never
/// allocates, and ends after at most `buf.len() / RECORD_ALIGN` steps.
pub struct SegmentScanner<'a> {
    buf: &'a [u8],
    seq: u64,
    offset: usize,
    end: Option<ScanEnd>,
}

impl<'a> SegmentScanner<'a> {
    /// Scans `buf` (the whole segment) from `data_offset`, with checksums seeded by `seq`.
    pub fn new(buf: &'a [u8], seq: u64, data_offset: usize) -> SegmentScanner<'a> {
        SegmentScanner {
            buf,
            seq,
            offset: data_offset.next_multiple_of(RECORD_ALIGN),
            end: None,
        }
    }

    /// How the scan ended; None while records remain.
    pub fn end(&self) -> Option<ScanEnd> {
        self.end
    }
}

impl<'a> Iterator for SegmentScanner<'a> {
    type Item = RecordView<'a>;

    fn next(&mut self) -> Option<RecordView<'a>> {
        if self.end.is_some() {
            return None;
        }
        match decode_record(self.buf, self.seq, self.offset) {
            Ok(record) => {
                if record.header.kind == RecordKind::Seal {
                    self.end = Some(ScanEnd::Sealed {
                        offset: self.offset,
                    });
                } else {
                    // record.len >= RECORD_HEADER_LEN, so the scan always advances.
                    self.offset += record.len;
                }
                Some(record)
            }
            Err(why) => {
                self.end = Some(ScanEnd::Stopped {
                    offset: self.offset,
                    why,
                });
                None
            }
        }
    }
}

/// What lies after the point where a scan stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardScan {
    /// The largest `synced_to` of any valid record found (at any aligned offset).
    pub max_synced_to: Option<u64>,
    /// One past the last non-zero byte seen, if any.
    pub nonzero_end: Option<usize>,
}

impl ForwardScan {
    /// Folds another scan's findings into this one.
    pub fn merge(&mut self, other: ForwardScan) {
        self.max_synced_to = self.max_synced_to.max(other.max_synced_to);
        if other.nonzero_end.is_some() {
            self.nonzero_end = other.nonzero_end;
        }
    }
}

static ZERO_BLOCK: [u8; 4096] = [0; 4096];

/// Looks at every aligned offset from `from` to the end of `buf` for a valid record of
/// segment `seq` and notes the largest `synced_to` claim and the extent of non-zero bytes.
/// Used only after a scan stopped, to tell a torn tail from corruption. Pure, bounded:
/// one step per 8 bytes, no allocation.
pub fn forward_scan(buf: &[u8], seq: u64, from: usize) -> ForwardScan {
    let mut found = ForwardScan::default();
    let mut offset = from.next_multiple_of(RECORD_ALIGN);
    while offset < buf.len() {
        // Fast path over unwritten space: whole zero blocks compared with memcmp.
        if let Some(block) = buf.get(offset..offset + ZERO_BLOCK.len()) {
            if block == &ZERO_BLOCK[..] {
                offset += ZERO_BLOCK.len();
                continue;
            }
        }
        let chunk_end = buf.len().min(offset + RECORD_ALIGN);
        let chunk = &buf[offset..chunk_end];
        if chunk.iter().all(|&b| b == 0) {
            offset += RECORD_ALIGN;
            continue;
        }
        let last_nonzero = chunk.iter().rposition(|&b| b != 0).unwrap_or(0);
        found.nonzero_end = Some(offset + last_nonzero + 1);
        if let Ok(record) = decode_record(buf, seq, offset) {
            found.max_synced_to = found.max_synced_to.max(Some(record.header.synced_to));
        }
        offset += RECORD_ALIGN;
    }
    found
}

/// Everything a scan finds in one segment's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    pub header: SegmentHeader,
    /// Valid records in order from the start (the Seal included).
    pub records: usize,
    pub end: ScanEnd,
    /// What lies after the end.
    pub after: ForwardScan,
}

/// Header, records and what follows them, for one segment's bytes: the entry point for a
/// fuzz target. Pure and bounded for any input: no panic, no allocation, O(len) steps.
pub fn scan_segment(buf: &[u8]) -> Result<SegmentSummary, HeaderError> {
    let header = decode_segment_header(buf)?;
    let mut scanner = SegmentScanner::new(buf, header.seq, header.data_offset as usize);
    let records = scanner.by_ref().count();
    // A scanner that yielded its last record has always ended; the default is never used.
    let end = scanner.end().unwrap_or(ScanEnd::Stopped {
        offset: buf.len(),
        why: RecordError::Truncated,
    });
    let from = match end {
        ScanEnd::Sealed { offset } => offset.saturating_add(RECORD_HEADER_LEN),
        ScanEnd::Stopped { offset, .. } => offset.saturating_add(RECORD_ALIGN),
    };
    Ok(SegmentSummary {
        header,
        records,
        end,
        after: forward_scan(buf, header.seq, from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            seq: 7,
            first_index: 100,
            segment_bytes: 8192,
            data_offset: 64,
        }
    }

    #[test]
    fn segment_header_roundtrip_and_rejects_damage() {
        let mut buf = vec![0u8; 8192];
        encode_segment_header(&mut buf, &header());
        assert_eq!(decode_segment_header(&buf), Ok(header()));
        for i in 0..SEGMENT_HEADER_LEN {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(decode_segment_header(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(
            decode_segment_header(&buf[..10]),
            Err(HeaderError::TooShort)
        );
    }

    #[test]
    fn record_roundtrip_and_seq_mixing() {
        let mut buf = vec![0u8; 256];
        let head = RecordHeader {
            kind: RecordKind::Entry,
            index: 5,
            term: 3,
            synced_to: position(7, 64),
        };
        let n = encode_record(&mut buf[8..], 7, &head, b"hello");
        assert_eq!(n, 48);
        let rec = decode_record(&buf, 7, 8).unwrap();
        assert_eq!(rec.header, head);
        assert_eq!(rec.payload, b"hello");
        // The same bytes under another segment sequence are not a record.
        assert_eq!(
            decode_record(&buf, 8, 8).unwrap_err(),
            RecordError::BadHeaderChecksum
        );
        // A damaged payload is told apart from a damaged header.
        buf[8 + RECORD_HEADER_LEN + 1] ^= 1;
        assert_eq!(
            decode_record(&buf, 7, 8).unwrap_err(),
            RecordError::BadPayloadChecksum
        );
        buf[8 + 9] ^= 1;
        assert_eq!(
            decode_record(&buf, 7, 8).unwrap_err(),
            RecordError::BadHeaderChecksum
        );
    }

    /// A small in-crate fuzz loop: arbitrary bytes, partly built from valid records, must
    /// never panic or loop in the scanner, the forward scan or the header decoder.
    #[test]
    fn scanner_survives_arbitrary_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2000 {
            let len = (next() % 2048) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len > 200 {
                // Some valid records, then damage.
                let mut at = 64;
                for i in 0..3 {
                    let plen = (next() % 40) as usize;
                    if at + record_len(plen) > len {
                        break;
                    }
                    let head = RecordHeader {
                        kind: RecordKind::Entry,
                        index: i,
                        term: 1,
                        synced_to: next(),
                    };
                    let payload = vec![7u8; plen];
                    at += encode_record(&mut buf[at..], 1, &head, &payload);
                }
                let flip = (next() as usize) % len;
                buf[flip] ^= 1 << (next() % 8);
            }
            let _ = decode_segment_header(&buf);
            if round % 3 == 0 && len >= SEGMENT_HEADER_LEN {
                // A valid header in front of arbitrary bytes reaches the record scan.
                let header = SegmentHeader {
                    seq: 1,
                    first_index: 1,
                    segment_bytes: MIN_SEGMENT_BYTES,
                    data_offset: 64,
                };
                encode_segment_header(&mut buf, &header);
                let summary = scan_segment(&buf).unwrap();
                assert!(summary.records <= buf.len() / RECORD_HEADER_LEN);
            } else {
                let _ = scan_segment(&buf);
            }
            let data_offset = (next() % 128) as usize;
            let mut scanner = SegmentScanner::new(&buf, 1, data_offset);
            let mut steps = 0;
            for rec in &mut scanner {
                assert!(rec.offset + rec.len <= buf.len());
                steps += 1;
                assert!(steps <= buf.len() / RECORD_ALIGN + 1);
            }
            assert!(scanner.end().is_some());
            let fwd = forward_scan(&buf, 1, data_offset);
            if let Some(end) = fwd.nonzero_end {
                assert!(end <= buf.len());
            }
        }
    }
}
