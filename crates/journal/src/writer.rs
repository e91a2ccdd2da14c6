//! The streaming writer: records go through a buffer of [`WRITE_BUFFER_BYTES`], so memory
//! stays bounded however long the run.
//!
//! When the bytes reach the file: the writer hands its buffer to the OS (write(2)) when
//! the buffer fills, and after every digest, snapshot and end record, and on
//! [`LogWriter::flush`]. [`LogWriter::sync`] (and the end record of a file writer, through
//! [`LogWriter::finish_file`]) also asks the OS to put it on the disk (fdatasync). So a
//! crash of the recording process loses at most the inputs since the last digest record
//! (or the last full buffer); a crash of the host loses what the OS had not written. The
//! tail left behind is a partial record at most, which a reader reports as truncated
//! after the whole records before it.

use crate::error::{JournalError, Result};
use crate::frame::{frame_header, preamble, RecordType};
use crate::record::{encode_digest, encode_end, encode_input, EndReason, LogHeader, StateDigest};
use machine::digest::RegionDigests;
use machine::Input;
use std::io::{BufWriter, Write};

/// The writer's buffer: a few hundred inputs, or one large frame.
pub const WRITE_BUFFER_BYTES: usize = 64 << 10;

pub struct LogWriter<W: Write> {
    out: BufWriter<W>,
    /// Bytes written so far (the offset of the next record).
    offset: u64,
    last_icount: u64,
    scratch: Vec<u8>,
    records: u64,
    /// The region digests of the last digest record since the last snapshot or delta
    /// record: the next digest record lists the regions changed since.
    last_regions: Option<RegionDigests>,
}

impl LogWriter<std::fs::File> {
    /// Creates (or truncates) the log at `path` and writes its header.
    pub fn create(path: &std::path::Path, header: &LogHeader) -> Result<LogWriter<std::fs::File>> {
        let file = std::fs::File::create(path).map_err(JournalError::Write)?;
        LogWriter::new(file, header)
    }

    /// Flushes and asks the OS to put the log on the disk.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.out.get_ref().sync_data().map_err(JournalError::Write)
    }

    /// Writes the end record, flushes and syncs.
    pub fn finish_file(mut self, state: StateDigest, regions: &RegionDigests, reason: EndReason) -> Result<u64> {
        self.end(state, regions, reason)?;
        self.sync()?;
        Ok(self.offset)
    }
}

impl<W: Write> LogWriter<W> {
    /// Writes the preamble and `header` to `out`, and flushes.
    pub fn new(out: W, header: &LogHeader) -> Result<LogWriter<W>> {
        let mut writer = LogWriter {
            out: BufWriter::with_capacity(WRITE_BUFFER_BYTES, out),
            offset: 0,
            last_icount: 0,
            scratch: Vec::new(),
            records: 0,
            last_regions: None,
        };
        writer.put(&preamble())?;
        let payload = header.encode();
        if payload.len() as u64 > RecordType::Header.max_payload_bytes() {
            return Err(JournalError::Unrecordable(format!("a header of {} bytes is too large", payload.len())));
        }
        writer.record(RecordType::Header, &payload)?;
        if let crate::Start::Snapshot { icount } = header.start {
            writer.last_icount = icount;
        }
        writer.flush()?;
        Ok(writer)
    }

    /// Bytes written so far, the buffered ones included.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// The icount of the last record (of the start, before any).
    pub fn last_icount(&self) -> u64 {
        self.last_icount
    }

    /// Records written after the header.
    pub fn records(&self) -> u64 {
        self.records
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(JournalError::Write)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn record(&mut self, record: RecordType, payload: &[u8]) -> Result<()> {
        let header = frame_header(record, payload.len() as u64, crc32c::crc32c(payload));
        self.put(&header)?;
        self.put(payload)?;
        if record != RecordType::Header {
            self.records += 1;
        }
        Ok(())
    }

    fn stamp(&mut self, icount: u64) -> Result<()> {
        let last = self.last_icount;
        if icount < last {
            return Err(JournalError::Unrecordable(format!("icount {icount} after a record at icount {last}")));
        }
        if icount - last > crate::MAX_RECORD_GAP_ICOUNT {
            return Err(JournalError::Unrecordable(format!(
                "icount {icount} is {} past the record at icount {last}, more than the {} a log may leave between \
                 two records (write a digest record in between)",
                icount - last,
                crate::MAX_RECORD_GAP_ICOUNT
            )));
        }
        self.last_icount = icount;
        Ok(())
    }

    /// Appends an input (buffered).
    pub fn input(&mut self, input: &Input) -> Result<()> {
        self.stamp(input.icount)?;
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        encode_input(input, &mut payload);
        let result = if payload.len() as u64 > RecordType::Input.max_payload_bytes() {
            Err(JournalError::Unrecordable(format!("an input of {} bytes is too large", payload.len())))
        } else {
            self.record(RecordType::Input, &payload)
        };
        self.scratch = payload;
        result
    }

    /// Appends a state digest and flushes. `regions` are the machine's region digests
    /// (`Machine::region_digests`), whose root must be `state.machine`.
    pub fn digest(&mut self, state: StateDigest, regions: &RegionDigests) -> Result<()> {
        let payload = self.digest_payload(&state, regions, None)?;
        self.record(RecordType::Digest, &payload)?;
        self.flush()
    }

    /// A digest or end record's payload, the regions listed against the last digest record's.
    fn digest_payload(
        &mut self,
        state: &StateDigest,
        regions: &RegionDigests,
        end: Option<EndReason>,
    ) -> Result<Vec<u8>> {
        let root = regions.root().0;
        if root != state.machine {
            let problem =
                format!("region digests whose root is {root:032x} for a machine digest {:032x}", state.machine);
            return Err(JournalError::Unrecordable(problem));
        }
        let mut payload = Vec::with_capacity(128);
        match end {
            None => encode_digest(state, regions, self.last_regions.as_ref(), &mut payload),
            Some(reason) => encode_end(state, regions, self.last_regions.as_ref(), reason, &mut payload),
        }
        let record = if end.is_some() { RecordType::End } else { RecordType::Digest };
        if payload.len() as u64 > record.max_payload_bytes() {
            return Err(JournalError::Unrecordable(format!(
                "a {} of {} bytes is too large",
                record.name(),
                payload.len()
            )));
        }
        self.stamp(state.icount)?;
        self.last_regions = Some(regions.clone());
        Ok(payload)
    }

    /// Appends a machine snapshot (`machine::snapshot`'s file format) taken at `icount`,
    /// and flushes.
    pub fn snapshot(&mut self, icount: u64, snapshot: &[u8]) -> Result<()> {
        self.streamed(RecordType::Snapshot, icount, snapshot)
    }

    /// Appends what changed since the previous snapshot or delta (a `machine::checkpoint`
    /// payload, not full) at `icount`, and flushes.
    pub fn delta(&mut self, icount: u64, payload: &[u8]) -> Result<()> {
        self.streamed(RecordType::Delta, icount, payload)
    }

    fn streamed(&mut self, record: RecordType, icount: u64, snapshot: &[u8]) -> Result<()> {
        self.stamp(icount)?;
        let len = 8 + snapshot.len() as u64;
        if len > record.max_payload_bytes() {
            return Err(JournalError::Unrecordable(format!("a {} of {len} bytes is too large", record.name())));
        }
        let icount_bytes = icount.to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&icount_bytes), snapshot);
        self.put(&frame_header(record, len, crc))?;
        self.put(&icount_bytes)?;
        self.put(snapshot)?;
        self.records += 1;
        // A seek starts reading after a snapshot or delta record: the next digest record
        // lists its regions against none.
        self.last_regions = None;
        self.flush()
    }

    /// Appends the end record and flushes; nothing may follow it.
    pub fn end(&mut self, state: StateDigest, regions: &RegionDigests, reason: EndReason) -> Result<()> {
        let payload = self.digest_payload(&state, regions, Some(reason))?;
        self.record(RecordType::End, &payload)?;
        self.flush()
    }

    /// Hands the buffered records to the OS.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(JournalError::Write)
    }

    /// Flushes and returns the output.
    pub fn into_inner(self) -> Result<W> {
        self.out.into_inner().map_err(|e| JournalError::Write(e.into_error()))
    }
}
