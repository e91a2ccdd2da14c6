//! The console stream from a monitor to its keeper, through a pipe: frames of a tag, a
//! length and a body. The keeper writes the console bytes to the terminal and counts them
//! in the shared region, so a new monitor knows to the byte what already left (a monitor
//! killed in the middle of a frame leaves its keeper a part of it, which counts as
//! delivered; the next monitor continues after it).

use crate::driver::ConsoleSink;
use std::io::Write;

const TAG_CONSOLE: u8 = 1;
const TAG_RESET: u8 = 2;
const TAG_END: u8 = 3;
const HEADER: usize = 5;
/// The largest body the keeper accepts (the monitor writes console output in slices).
const MAX_BODY: usize = 16 << 20;

/// The monitor's console: frames on the pipe to the keeper.
pub struct StreamSink {
    out: std::fs::File,
}

impl StreamSink {
    pub fn new(out: std::fs::File) -> StreamSink {
        StreamSink { out }
    }

    fn frame(&mut self, tag: u8, body: &[u8]) -> std::io::Result<()> {
        for chunk in body.chunks(MAX_BODY).chain(body.is_empty().then_some(&[][..])) {
            let mut buf = Vec::with_capacity(HEADER + chunk.len());
            buf.push(tag);
            buf.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            buf.extend_from_slice(chunk);
            self.out.write_all(&buf)?;
        }
        Ok(())
    }

    /// The VM ended: the keeper exits with `code`.
    pub fn end(&mut self, code: i32) -> std::io::Result<()> {
        self.frame(TAG_END, &code.to_le_bytes())
    }
}

impl ConsoleSink for StreamSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.frame(TAG_CONSOLE, bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn rebooted(&mut self) -> std::io::Result<()> {
        self.frame(TAG_RESET, &[])
    }
}

/// What the keeper reads from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Console(&'a [u8]),
    Reset,
    End(i32),
}

/// The keeper's reader of one monitor's stream (a new monitor starts a new one).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parser {
    header: Vec<u8>,
    tag: u8,
    remaining: usize,
    end: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the monitor's console stream is malformed: {0}")]
pub struct StreamError(String);

impl Parser {
    /// The reader's place within a frame, as text: a keeper re-executed for an upgrade
    /// reads on from where its former self stopped.
    pub fn encode(&self) -> String {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        format!("{}.{}.{}.{}", hex(&self.header), self.tag, self.remaining, hex(&self.end))
    }

    pub fn decode(text: &str) -> Option<Parser> {
        let unhex = |t: &str| -> Option<Vec<u8>> {
            if !t.len().is_multiple_of(2) || t.len() > 2 * HEADER {
                return None;
            }
            (0..t.len()).step_by(2).map(|i| u8::from_str_radix(&t[i..i + 2], 16).ok()).collect()
        };
        let mut parts = text.split('.');
        let header = unhex(parts.next()?)?;
        let tag = parts.next()?.parse().ok()?;
        let remaining: usize = parts.next()?.parse().ok()?;
        let end = unhex(parts.next()?)?;
        (parts.next().is_none() && remaining <= MAX_BODY).then_some(Parser { header, tag, remaining, end })
    }

    /// Feed bytes as they arrive; `event` sees console bytes as soon as they do.
    pub fn feed(&mut self, mut bytes: &[u8], event: &mut dyn FnMut(Event<'_>)) -> Result<(), StreamError> {
        while !bytes.is_empty() {
            if self.remaining == 0 && self.header.len() < HEADER {
                let take = (HEADER - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < HEADER {
                    return Ok(());
                }
                self.tag = self.header[0];
                self.remaining = u32::from_le_bytes(self.header[1..5].try_into().expect("4 bytes")) as usize;
                match (self.tag, self.remaining) {
                    (TAG_CONSOLE, 1..=MAX_BODY) | (TAG_END, 4) => {}
                    (TAG_RESET, 0) => {
                        event(Event::Reset);
                        self.header.clear();
                        continue;
                    }
                    (tag, len) => return Err(StreamError(format!("a frame of tag {tag} and {len} bytes"))),
                }
            }
            let take = self.remaining.min(bytes.len());
            let (body, rest) = bytes.split_at(take);
            bytes = rest;
            self.remaining -= take;
            if self.tag == TAG_CONSOLE {
                event(Event::Console(body));
            } else {
                self.end.extend_from_slice(body);
                if self.remaining == 0 {
                    event(Event::End(i32::from_le_bytes(self.end[..4].try_into().expect("4 bytes"))));
                }
            }
            if self.remaining == 0 {
                self.header.clear();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parser: &mut Parser, bytes: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        parser.feed(bytes, &mut |e| seen.push(format!("{e:?}"))).unwrap();
        seen
    }

    #[test]
    fn frames_split_anywhere_give_the_same_bytes() {
        let (r, w) = std::io::pipe().unwrap();
        let mut sink = StreamSink::new(std::fs::File::from(std::os::fd::OwnedFd::from(w)));
        sink.write(b"hello").unwrap();
        sink.rebooted().unwrap();
        sink.write(b"again").unwrap();
        sink.end(3).unwrap();
        drop(sink);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(std::os::fd::OwnedFd::from(r)), &mut bytes).unwrap();
        let mut parser = Parser::default();
        let mut text = Vec::new();
        let mut seen = Vec::new();
        for b in bytes.chunks(3) {
            parser
                .feed(b, &mut |e| match e {
                    Event::Console(c) => text.extend_from_slice(c),
                    other => seen.push(format!("{other:?}")),
                })
                .unwrap();
        }
        assert_eq!(text, b"helloagain");
        assert_eq!(seen, ["Reset", "End(3)"]);
    }

    #[test]
    fn a_parser_goes_on_from_its_encoded_place() {
        let mut frames = Vec::new();
        frames.extend_from_slice(&[TAG_CONSOLE, 5, 0, 0, 0]);
        frames.extend_from_slice(b"hello");
        frames.extend_from_slice(&[TAG_END, 4, 0, 0, 0, 3, 0, 0, 0]);
        for cut in 0..frames.len() {
            let (mut text, mut ends) = (Vec::new(), Vec::new());
            let mut collect = |e: Event<'_>| match e {
                Event::Console(b) => text.extend_from_slice(b),
                Event::End(code) => ends.push(code),
                Event::Reset => {}
            };
            let mut first = Parser::default();
            first.feed(&frames[..cut], &mut collect).unwrap();
            let mut second = Parser::decode(&first.encode()).unwrap();
            assert_eq!(second, first);
            second.feed(&frames[cut..], &mut collect).unwrap();
            assert_eq!((text.as_slice(), ends.as_slice()), (&b"hello"[..], &[3][..]), "cut at {cut}");
        }
        assert!(Parser::decode("zz.1.0.").is_none());
    }

    #[test]
    fn a_malformed_frame_is_refused() {
        let mut parser = Parser::default();
        let err = parser.feed(&[9, 0, 0, 0, 0], &mut |_| {}).unwrap_err();
        assert_eq!(err.to_string(), "the monitor's console stream is malformed: a frame of tag 9 and 0 bytes");
        assert!(events(&mut Parser::default(), &[1, 2, 0, 0, 0, b'h']).len() == 1);
    }
}
