//! The reader: checks the preamble and the header, then hands out records one by one,
//! each checked (frame checksum before its length is trusted, the length against the
//! type's cap, the payload's checksum, instruction counts never going back). Memory is
//! bounded by the largest input record and the region digests of the machine the header
//! names (a digest record is capped by them before it is read): snapshots stream past.

use crate::error::{JournalError, Result};
use crate::frame::{check_preamble, parse_frame_header, RecordType, FRAME_HEADER_BYTES, PREAMBLE_BYTES};
use crate::record::{decode_digest, decode_end, decode_input, LogHeader, Record, DIGEST_FIXED_BYTES, END_FIXED_BYTES};
use machine::digest::RegionDigests;
use std::io::{BufReader, Read, Seek, SeekFrom};

/// Where a snapshot's bytes lie in the log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

impl Section {
    /// A reader of just this section of `file` (`Read + Seek`, as `machine::snapshot`
    /// needs), which never reads past it.
    pub fn open<'f>(&self, file: &'f std::fs::File) -> SectionReader<'f> {
        SectionReader { file, section: *self, pos: 0 }
    }
}

pub struct SectionReader<'f> {
    file: &'f std::fs::File,
    section: Section,
    pos: u64,
}

impl Read for SectionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = self.section.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.section.offset + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for SectionReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.section.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        self.pos = target;
        Ok(target)
    }
}

pub struct LogReader<R: Read> {
    input: BufReader<R>,
    /// The offset of the next byte to read.
    offset: u64,
    header: LogHeader,
    last_icount: u64,
    ended: bool,
    scratch: Vec<u8>,
    /// The region digests of the last digest record since the last snapshot or delta
    /// record (the next one lists its changes against them), and how many regions a digest
    /// record of this log may list at most (from the header's RAM and disk).
    last_regions: Option<RegionDigests>,
    max_regions: u64,
    /// A log that starts from a snapshot: its icount, until its first record (that snapshot) is read.
    start_snapshot: Option<u64>,
}

impl LogReader<std::fs::File> {
    pub fn open_path(path: &std::path::Path) -> Result<LogReader<std::fs::File>> {
        let file = std::fs::File::open(path)
            .map_err(|source| JournalError::Read { what: path.display().to_string(), source })?;
        LogReader::new(file)
    }
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the preamble and the header record.
    pub fn new(input: R) -> Result<LogReader<R>> {
        let mut reader = LogReader {
            input: BufReader::with_capacity(64 << 10, input),
            offset: 0,
            header: placeholder_header(),
            last_icount: 0,
            ended: false,
            scratch: Vec::new(),
            last_regions: None,
            max_regions: 0,
            start_snapshot: None,
        };
        let mut preamble = [0; PREAMBLE_BYTES];
        let got = reader.fill(&mut preamble)?;
        if got < 8 || preamble[..8] != crate::MAGIC {
            return Err(JournalError::NotALog { found: preamble[..got.min(8)].to_vec() });
        }
        if got < PREAMBLE_BYTES {
            return Err(JournalError::Truncated {
                offset: 0,
                what: "preamble",
                missing: (PREAMBLE_BYTES - got) as u64,
            });
        }
        check_preamble(&preamble)?;
        reader.offset = PREAMBLE_BYTES as u64;
        let start = reader.offset;
        match reader.frame()? {
            Some((frame, _)) if frame.record == RecordType::Header => {
                let payload = reader.payload(start, frame)?;
                reader.header = LogHeader::decode(&payload, start)?;
            }
            Some((frame, _)) => {
                let problem = format!("the first record is a {} record, not the header", frame.record.name());
                return Err(JournalError::Corrupt { offset: start, problem });
            }
            None => return Err(JournalError::Truncated { offset: start, what: "header record", missing: 1 }),
        }
        if let crate::Start::Snapshot { icount } = reader.header.start {
            reader.last_icount = icount;
            reader.start_snapshot = Some(icount);
        }
        let disk_sectors = reader.header.disk.as_ref().map_or(0, |d| d.sectors);
        // One region more of each than the header's sizes round up to (a disk's last
        // region may be short).
        reader.max_regions = crate::regions::max_regions(reader.header.ram_size, disk_sectors).saturating_add(2);
        Ok(reader)
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the end record was read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads as much of `buf` as the input holds; returns how much.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(JournalError::Read { what: "the input log".into(), source }),
            }
        }
        Ok(got)
    }

    /// The next frame header (None at the end of the input, on a record boundary).
    fn frame(&mut self) -> Result<Option<(crate::frame::Frame, u64)>> {
        let start = self.offset;
        let mut header = [0; FRAME_HEADER_BYTES];
        let got = self.fill(&mut header)?;
        if got == 0 {
            return Ok(None);
        }
        if got < FRAME_HEADER_BYTES {
            let missing = (FRAME_HEADER_BYTES - got) as u64;
            return Err(JournalError::Truncated { offset: start, what: "record's frame header", missing });
        }
        let frame = parse_frame_header(&header, start)?;
        self.offset += FRAME_HEADER_BYTES as u64;
        Ok(Some((frame, start)))
    }

    /// A (small) record's payload, checked.
    fn payload(&mut self, start: u64, frame: crate::frame::Frame) -> Result<Vec<u8>> {
        let len = frame.payload_len as usize; // capped at MAX_INPUT_BYTES or less
        let mut payload = std::mem::take(&mut self.scratch);
        payload.resize(len, 0);
        let got = self.fill(&mut payload)?;
        if got < len {
            let what = frame.record.name();
            return Err(JournalError::Truncated {
                offset: start,
                what: record_what(what),
                missing: (len - got) as u64,
            });
        }
        self.offset += len as u64;
        check_crc(start, frame, crc32c::crc32c(&payload))?;
        Ok(payload)
    }

    /// The next record; None once the input ends on a record boundary (or after the end
    /// record). A partial record at the end is [`JournalError::Truncated`].
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.ended {
            return self.nothing_after_the_end();
        }
        let Some((frame, start)) = self.frame()? else { return Ok(None) };
        let record = match frame.record {
            RecordType::Header => {
                return Err(JournalError::Corrupt { offset: start, problem: "a second header record".into() });
            }
            RecordType::Snapshot => {
                let (icount, section) = self.streamed(start, frame)?;
                Record::Snapshot { icount, section }
            }
            RecordType::Delta => {
                let (icount, section) = self.streamed(start, frame)?;
                Record::Delta { icount, section }
            }
            RecordType::Input => {
                let payload = self.payload(start, frame)?;
                let input = decode_input(&payload, start);
                self.scratch = payload;
                Record::Input(input?)
            }
            RecordType::Digest => {
                self.check_digest_len(start, frame, DIGEST_FIXED_BYTES)?;
                let payload = self.payload(start, frame)?;
                let (state, regions) = decode_digest(&payload, start, self.last_regions.as_ref(), self.max_regions)?;
                self.last_regions.clone_from(&regions);
                Record::Digest { state, regions }
            }
            RecordType::End => {
                self.check_digest_len(start, frame, END_FIXED_BYTES)?;
                let payload = self.payload(start, frame)?;
                let (state, regions, reason) =
                    decode_end(&payload, start, self.last_regions.as_ref(), self.max_regions)?;
                self.ended = true;
                Record::End { state, regions, reason }
            }
        };
        if matches!(record, Record::Snapshot { .. } | Record::Delta { .. }) {
            self.last_regions = None;
        }
        let icount = record.icount();
        let last = self.last_icount;
        if icount < last {
            let problem = format!("its icount {icount} is before the previous record's {last}");
            return Err(JournalError::Corrupt { offset: start, problem });
        }
        if icount - last > crate::MAX_RECORD_GAP_ICOUNT {
            let problem = format!(
                "its icount {icount} is {} past the previous record's {last}, more than the {} a recorder leaves \
                 between two records",
                icount - last,
                crate::MAX_RECORD_GAP_ICOUNT
            );
            return Err(JournalError::Corrupt { offset: start, problem });
        }
        if let Some(start_icount) = self.start_snapshot.take() {
            if !matches!(record, Record::Snapshot { icount, .. } if icount == start_icount) {
                let problem = format!(
                    "the header says the run starts from a snapshot at icount {start_icount}, but the first record \
                     is {} record at icount {icount}",
                    a_kind(&record)
                );
                return Err(JournalError::Corrupt { offset: start, problem });
            }
        }
        self.last_icount = icount;
        Ok(Some(record))
    }

    /// Nothing follows an end record (a recorder writes none after it: bytes there were put
    /// there by something else, and a replay would not look at them).
    fn nothing_after_the_end(&mut self) -> Result<Option<Record>> {
        let mut byte = [0; 1];
        if self.fill(&mut byte)? == 0 {
            return Ok(None);
        }
        let problem = "there are bytes after the end record".to_string();
        Err(JournalError::Corrupt { offset: self.offset, problem })
    }

    /// A digest or end record may list every region of the machine the header names, no more.
    fn check_digest_len(&self, start: u64, frame: crate::frame::Frame, fixed: u64) -> Result<()> {
        let max = crate::regions::max_record_bytes(fixed, self.max_regions);
        if frame.payload_len > max {
            let problem = format!(
                "a {} record of {} bytes, more than the {max} the region digests of the log's RAM and disk need",
                frame.record.name(),
                frame.payload_len
            );
            return Err(JournalError::Corrupt { offset: start, problem });
        }
        Ok(())
    }

    /// A snapshot or delta record: its checksum checked as it streams past, nothing kept.
    fn streamed(&mut self, start: u64, frame: crate::frame::Frame) -> Result<(u64, Section)> {
        let what = if frame.record == RecordType::Delta { "snapshot delta record" } else { "snapshot record" };
        let truncated = |missing| JournalError::Truncated { offset: start, what, missing };
        if frame.payload_len < 8 {
            let problem = format!("a {what} of {} bytes has no icount", frame.payload_len);
            return Err(JournalError::Corrupt { offset: start, problem });
        }
        let mut icount_bytes = [0; 8];
        let got = self.fill(&mut icount_bytes)?;
        if got < 8 {
            return Err(truncated(frame.payload_len - got as u64));
        }
        let mut crc = crc32c::crc32c(&icount_bytes);
        let section = Section { offset: self.offset + 8, len: frame.payload_len - 8 };
        let mut left = section.len;
        let mut buf = vec![0; 64 << 10];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            let got = self.fill(&mut buf[..n])?;
            crc = crc32c::crc32c_append(crc, &buf[..got]);
            if got < n {
                return Err(truncated(left - got as u64));
            }
            left -= n as u64;
        }
        self.offset += frame.payload_len;
        check_crc(start, frame, crc)?;
        Ok((u64::from_le_bytes(icount_bytes), section))
    }
}

impl<R: Read + Seek> LogReader<R> {
    /// Goes on reading at `offset`, the offset of a record this reader (or another
    /// reader of the same log) handed out or stood at; `icount` is that record's. Right
    /// after a snapshot or delta record, digest records carry their regions again at once;
    /// elsewhere, from the first digest record after the next snapshot or delta.
    pub fn seek_to_record(&mut self, offset: u64, icount: u64) -> Result<()> {
        self.input
            .seek(SeekFrom::Start(offset))
            .map_err(|source| JournalError::Read { what: "the input log".into(), source })?;
        self.offset = offset;
        self.last_icount = icount;
        self.ended = false;
        self.last_regions = None;
        self.start_snapshot = None;
        Ok(())
    }
}

/// "an input", "a digest", ... (for errors).
fn a_kind(record: &Record) -> &'static str {
    match record {
        Record::Input(_) => "an input",
        Record::Digest { .. } => "a digest",
        Record::Snapshot { .. } => "a snapshot",
        Record::Delta { .. } => "a snapshot delta",
        Record::End { .. } => "an end",
    }
}

fn record_what(name: &'static str) -> &'static str {
    match name {
        "header" => "header record",
        "input" => "input record",
        "digest" => "digest record",
        "end" => "end record",
        _ => "record",
    }
}

fn check_crc(start: u64, frame: crate::frame::Frame, computed: u32) -> Result<()> {
    if computed != frame.payload_crc {
        let problem = format!(
            "the {} record's checksum is {:#010x}, its payload's {computed:#010x}",
            frame.record.name(),
            frame.payload_crc
        );
        return Err(JournalError::Corrupt { offset: start, problem });
    }
    Ok(())
}

fn placeholder_header() -> LogHeader {
    LogHeader {
        start: crate::Start::Boot,
        ram_size: 0,
        icount_per_tick: 0,
        boot_unix_ns: 0,
        reboot_on_reset: false,
        net_mac: None,
        seed: None,
        bootargs: String::new(),
        kernel: crate::ImageFile { path: String::new(), size_bytes: 0, sha256: [0; 32] },
        initrd: None,
        disk: None,
    }
}
