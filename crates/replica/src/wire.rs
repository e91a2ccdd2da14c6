//! The frame format of the replication channel: versioned, length-prefixed, checksummed and
//! authenticated frames, an [`Encoder`] that numbers them and a streaming [`Decoder`] that
//! checks everything before it trusts anything.
//!
//! ```text
//!  0      4        6      7       8              16          20
//!  +------+--------+------+-------+--------------+-----------+-----------+--------+-----------+
//!  | FTVR | version| type | flags | sequence u64 | length u32| payload   | CRC32C | HMAC-SHA256|
//!  +------+--------+------+-------+--------------+-----------+-----------+--------+-----------+
//!          u16 LE                  LE             LE          `length`    LE u32   32 bytes
//! ```
//!
//! The CRC32C and the HMAC both cover header + payload. The CRC tells line noise (or a bug)
//! from a forgery: a frame whose CRC holds but whose HMAC does not was made with another key.
//! A connection's first frame may carry at most [`MAX_FIRST_PAYLOAD_BYTES`]: until a frame
//! has been authenticated, a stranger cannot make the decoder buffer more.
//! Sequence numbers start at 0 on each connection, per direction, and go up by exactly one, so
//! a lost, duplicated or reordered frame is caught here. Keys are per direction and, after the
//! handshake, per connection (see [`PresharedKey::session_key`]), so a frame recorded on one
//! connection cannot be replayed into another nor reflected back to its sender.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// The four bytes every frame begins with.
pub const MAGIC: [u8; 4] = *b"FTVR";
/// The version of the frame format this crate reads and writes.
pub const WIRE_VERSION: u16 = 1;
/// Bytes before the payload: magic, version, type, flags, sequence, length.
pub const HEADER_BYTES: usize = 20;
/// Bytes after the payload: CRC32C and HMAC-SHA256.
pub const TRAILER_BYTES: usize = CRC_BYTES + MAC_BYTES;
const CRC_BYTES: usize = 4;
const MAC_BYTES: usize = 32;
/// The largest payload a frame may announce. A decoder rejects a larger length before it
/// allocates or waits for a single payload byte.
pub const MAX_PAYLOAD_BYTES: u32 = 64 << 20;
/// The largest payload of a connection's first frame, before the peer has proven it holds
/// the key: a stranger cannot make a decoder buffer more than this.
pub const MAX_FIRST_PAYLOAD_BYTES: u32 = 4096;
/// A pre-shared key shorter than this is refused: it would be guessable.
pub const MIN_KEY_BYTES: usize = 16;
/// A key file larger than this is surely the wrong file.
pub const MAX_KEY_BYTES: usize = 4096;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 16;

const _: () = assert!(HEADER_BYTES == 4 + 2 + 1 + 1 + 8 + 4);
const _: () = assert!(MAX_FIRST_PAYLOAD_BYTES <= MAX_PAYLOAD_BYTES);
const _: () = assert!((MAX_PAYLOAD_BYTES as usize) + HEADER_BYTES + TRAILER_BYTES < u32::MAX as usize);

/// A handshake nonce, chosen at random by each side for each connection.
pub type Nonce = [u8; NONCE_BYTES];

type HmacSha256 = Hmac<Sha256>;

/// Everything that can be wrong with a byte stream. Any of them is final for the connection:
/// the decoder returns the same error from then on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error(
        "not an ftvm replication stream: a frame began with {found:02x?}, expected \"FTVR\" \
         (is another program talking to this port?)"
    )]
    BadMagic { found: Vec<u8> },
    #[error(
        "the peer speaks replication wire version {theirs}, this ftvm speaks version {ours}: \
         run the same ftvm release on both sides"
    )]
    UnsupportedVersion { theirs: u16, ours: u16 },
    #[error("frame {seq} has flags {flags:#04x}, which this version does not define")]
    UnknownFlags { seq: u64, flags: u8 },
    #[error(
        "a frame announces a {length}-byte payload, more than the limit of {limit} bytes: \
         the stream is corrupt or the peer is not a compatible ftvm"
    )]
    Oversized { length: u64, limit: u32 },
    #[error("frame {seq} failed its CRC32C checksum: the data was corrupted in transit")]
    BadChecksum { seq: u64 },
    #[error(
        "the peer's first frame failed authentication: the two sides use different \
         pre-shared keys (give both the same --key FILE)"
    )]
    WrongKey,
    #[error(
        "frame {seq} failed HMAC authentication: it was forged, replayed from another \
         connection, or corrupted"
    )]
    BadAuthentication { seq: u64 },
    #[error(
        "frame sequence number {found} where {expected} was due: a frame was lost, \
         duplicated or reordered"
    )]
    OutOfOrder { expected: u64, found: u64 },
    #[error("the connection ended in the middle of a frame ({buffered} bytes of it had arrived)")]
    Truncated { buffered: usize },
    #[error("a {length}-byte payload cannot be sent: frames carry at most {limit} bytes")]
    PayloadTooLarge { length: usize, limit: u32 },
}

/// Why a pre-shared key was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("the pre-shared key has {length} bytes; it needs at least {MIN_KEY_BYTES} (e.g. 32 random bytes)")]
    TooShort { length: usize },
    #[error("the pre-shared key has {length} bytes, more than {MAX_KEY_BYTES}: is this the right file?")]
    TooLong { length: usize },
}

/// Which way a frame travels; each direction has its own key, so a frame cannot be reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    PrimaryToBackup,
    BackupToPrimary,
}

impl Direction {
    fn label(self) -> u8 {
        match self {
            Direction::PrimaryToBackup => b'P',
            Direction::BackupToPrimary => b'B',
        }
    }
}

/// The pre-shared key both sides were given. Never printed.
#[derive(Clone)]
pub struct PresharedKey(Vec<u8>);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresharedKey({} bytes, redacted)", self.0.len())
    }
}

impl PresharedKey {
    /// Takes the key's bytes as they are (a key file's whole contents, for instance).
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { length: bytes.len() });
        }
        if bytes.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong { length: bytes.len() });
        }
        Ok(PresharedKey(bytes.to_vec()))
    }

    fn derive(&self, parts: &[&[u8]]) -> FrameKey {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        for part in parts {
            mac.update(part);
        }
        FrameKey::from_secret(&mac.finalize().into_bytes())
    }

    /// The key of the handshake frames (the first frame each way on a connection).
    pub fn hello_key(&self, direction: Direction) -> FrameKey {
        self.derive(&[b"ftvr/1 hello", &[direction.label()]])
    }

    /// The key of every frame after the handshake: bound to both sides' nonces, so frames
    /// of one connection fail authentication on any other.
    pub fn session_key(&self, direction: Direction, primary_nonce: &Nonce, backup_nonce: &Nonce) -> FrameKey {
        self.derive(&[b"ftvr/1 session", &[direction.label()], primary_nonce, backup_nonce])
    }
}

/// A keyed HMAC state, cloned for each frame so the key schedule runs once.
#[derive(Clone)]
pub struct FrameKey(HmacSha256);

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(redacted)")
    }
}

impl FrameKey {
    /// A frame key from secret bytes (tests and tools; the protocol derives its keys).
    pub fn from_secret(secret: &[u8]) -> Self {
        FrameKey(HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length"))
    }

    fn tag(&self, authenticated: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = self.0.clone();
        mac.update(authenticated);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, authenticated: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.0.clone();
        mac.update(authenticated);
        mac.verify_slice(tag).is_ok()
    }
}

/// One decoded frame: its type, its sequence number and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub frame_type: u8,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// Turns payloads into frames, numbering them.
#[derive(Debug)]
pub struct Encoder {
    key: FrameKey,
    next_seq: u64,
}

impl Encoder {
    pub fn new(key: FrameKey) -> Self {
        Encoder { key, next_seq: 0 }
    }

    /// Changes the key of the frames encoded from now on (after the handshake).
    pub fn set_key(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// The whole frame for `payload`, with the next sequence number.
    pub fn encode(&mut self, frame_type: u8, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&n| n <= MAX_PAYLOAD_BYTES)
            .ok_or(WireError::PayloadTooLarge { length: payload.len(), limit: MAX_PAYLOAD_BYTES })?;
        let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len() + TRAILER_BYTES);
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        frame.push(frame_type);
        frame.push(0); // flags: none defined in version 1
        frame.extend_from_slice(&self.next_seq.to_le_bytes());
        frame.extend_from_slice(&length.to_le_bytes());
        frame.extend_from_slice(payload);
        let crc = crc32c::crc32c(&frame);
        let tag = self.key.tag(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&tag);
        self.next_seq += 1;
        Ok(frame)
    }
}

/// Reassembles frames from a byte stream cut anywhere, and checks each one.
#[derive(Debug)]
pub struct Decoder {
    key: FrameKey,
    buf: Vec<u8>,
    /// Where the next frame begins in `buf`; bytes before it are consumed.
    start: usize,
    next_seq: u64,
    failed: Option<WireError>,
}

impl Decoder {
    pub fn new(key: FrameKey) -> Self {
        Decoder { key, buf: Vec::new(), start: 0, next_seq: 0, failed: None }
    }

    /// Changes the key that frames decoded from now on must carry (after the handshake).
    pub fn set_key(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole, verified frame; `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.parse() {
            Ok(frame) => Ok(frame),
            Err(error) => {
                self.failed = Some(error.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(error)
            }
        }
    }

    /// The stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.buffered_len() {
            0 => Ok(()),
            buffered => Err(WireError::Truncated { buffered }),
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>, WireError> {
        let bytes = &self.buf[self.start..];
        // The magic is checked on its first byte already, so that a stranger's stream is
        // refused at once rather than after a header's worth of bytes.
        let magic_seen = bytes.len().min(MAGIC.len());
        if bytes[..magic_seen] != MAGIC[..magic_seen] {
            return Err(WireError::BadMagic { found: bytes[..magic_seen].to_vec() });
        }
        if bytes.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header = Header::read(bytes[..HEADER_BYTES].try_into().expect("header length"));
        if header.version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { theirs: header.version, ours: WIRE_VERSION });
        }
        let limit = match self.next_seq {
            0 => MAX_FIRST_PAYLOAD_BYTES,
            _ => MAX_PAYLOAD_BYTES,
        };
        if header.length > limit {
            return Err(WireError::Oversized { length: header.length.into(), limit });
        }
        let covered = HEADER_BYTES + header.length as usize;
        let total = covered + TRAILER_BYTES;
        if bytes.len() < total {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(bytes[covered..covered + CRC_BYTES].try_into().expect("crc length"));
        if crc32c::crc32c(&bytes[..covered]) != crc {
            return Err(WireError::BadChecksum { seq: header.seq });
        }
        if !self.key.verify(&bytes[..covered], &bytes[covered + CRC_BYTES..total]) {
            return Err(match self.next_seq {
                0 => WireError::WrongKey,
                _ => WireError::BadAuthentication { seq: header.seq },
            });
        }
        if header.seq != self.next_seq {
            return Err(WireError::OutOfOrder { expected: self.next_seq, found: header.seq });
        }
        if header.flags != 0 {
            return Err(WireError::UnknownFlags { seq: header.seq, flags: header.flags });
        }
        let payload = bytes[HEADER_BYTES..covered].to_vec();
        self.start += total;
        self.next_seq += 1;
        Ok(Some(Frame { frame_type: header.frame_type, seq: header.seq, payload }))
    }
}

struct Header {
    version: u16,
    frame_type: u8,
    flags: u8,
    seq: u64,
    length: u32,
}

impl Header {
    fn read(bytes: &[u8; HEADER_BYTES]) -> Header {
        Header {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
            frame_type: bytes[6],
            flags: bytes[7],
            seq: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> FrameKey {
        FrameKey::from_secret(&[byte; 32])
    }

    fn decode_all(decoder: &mut Decoder) -> Result<Vec<Frame>, WireError> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    #[test]
    fn frames_round_trip_when_fed_one_byte_at_a_time() {
        let mut encoder = Encoder::new(key(1));
        let mut stream = encoder.encode(7, b"hello").unwrap();
        stream.extend(encoder.encode(9, b"").unwrap());
        let mut decoder = Decoder::new(key(1));
        let mut frames = Vec::new();
        for byte in &stream {
            decoder.push(std::slice::from_ref(byte));
            frames.extend(decode_all(&mut decoder).unwrap());
        }
        assert_eq!(
            frames,
            vec![
                Frame { frame_type: 7, seq: 0, payload: b"hello".to_vec() },
                Frame { frame_type: 9, seq: 1, payload: vec![] },
            ]
        );
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn a_stranger_stream_is_refused_at_its_first_byte() {
        let mut decoder = Decoder::new(key(1));
        decoder.push(b"G");
        assert_eq!(decoder.next_frame(), Err(WireError::BadMagic { found: b"G".to_vec() }));
    }

    #[test]
    fn another_version_is_named_with_ours() {
        let mut frame = Encoder::new(key(1)).encode(1, b"x").unwrap();
        frame[4] = 2;
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        assert_eq!(decoder.next_frame(), Err(WireError::UnsupportedVersion { theirs: 2, ours: 1 }));
        assert!(WireError::UnsupportedVersion { theirs: 2, ours: 1 }.to_string().contains("version 2"));
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"").unwrap();
        let mut header = encoder.encode(1, b"").unwrap();
        header[16..20].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
        let mut decoder = Decoder::new(key(1));
        decoder.push(&first);
        assert!(decoder.next_frame().unwrap().is_some());
        decoder.push(&header[..HEADER_BYTES]);
        assert_eq!(
            decoder.next_frame(),
            Err(WireError::Oversized { length: u64::from(MAX_PAYLOAD_BYTES) + 1, limit: MAX_PAYLOAD_BYTES })
        );
    }

    #[test]
    fn a_large_first_frame_is_refused_before_the_peer_is_authenticated() {
        let mut encoder = Encoder::new(key(1));
        let big = vec![0; MAX_FIRST_PAYLOAD_BYTES as usize + 1];
        let mut decoder = Decoder::new(key(1));
        decoder.push(&encoder.encode(1, &big).unwrap()[..HEADER_BYTES]);
        let expected = WireError::Oversized { length: big.len() as u64, limit: MAX_FIRST_PAYLOAD_BYTES };
        assert_eq!(decoder.next_frame(), Err(expected));
        // After one authenticated frame, the full limit applies.
        let mut encoder = Encoder::new(key(1));
        let mut decoder = Decoder::new(key(1));
        decoder.push(&encoder.encode(1, b"hello").unwrap());
        decoder.push(&encoder.encode(1, &big).unwrap());
        assert!(decoder.next_frame().unwrap().is_some());
        assert_eq!(decoder.next_frame().unwrap().map(|f| f.payload.len()), Some(big.len()));
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_checksum() {
        let mut frame = Encoder::new(key(1)).encode(1, b"payload").unwrap();
        frame[HEADER_BYTES + 2] ^= 0x10;
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        assert_eq!(decoder.next_frame(), Err(WireError::BadChecksum { seq: 0 }));
    }

    #[test]
    fn a_different_key_on_the_first_frame_is_reported_as_wrong_key() {
        let frame = Encoder::new(key(2)).encode(1, b"payload").unwrap();
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        assert_eq!(decoder.next_frame(), Err(WireError::WrongKey));
    }

    #[test]
    fn a_forged_later_frame_fails_authentication() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"a").unwrap();
        let mut forger = Encoder::new(key(3));
        forger.next_seq = 1;
        let forged = forger.encode(1, b"b").unwrap();
        let mut decoder = Decoder::new(key(1));
        decoder.push(&first);
        decoder.push(&forged);
        assert_eq!(decoder.next_frame().unwrap().map(|f| f.seq), Some(0));
        assert_eq!(decoder.next_frame(), Err(WireError::BadAuthentication { seq: 1 }));
    }

    #[test]
    fn a_duplicated_frame_is_out_of_order() {
        let frame = Encoder::new(key(1)).encode(1, b"a").unwrap();
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        decoder.push(&frame);
        assert!(decoder.next_frame().unwrap().is_some());
        assert_eq!(decoder.next_frame(), Err(WireError::OutOfOrder { expected: 1, found: 0 }));
    }

    #[test]
    fn errors_are_final() {
        let mut decoder = Decoder::new(key(1));
        decoder.push(b"XXXX");
        let error = decoder.next_frame().unwrap_err();
        decoder.push(&Encoder::new(key(1)).encode(1, b"a").unwrap());
        assert_eq!(decoder.next_frame(), Err(error.clone()));
        assert_eq!(decoder.finish(), Err(error));
    }

    #[test]
    fn a_stream_cut_mid_frame_is_truncated_at_finish() {
        let frame = Encoder::new(key(1)).encode(1, b"abc").unwrap();
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame[..frame.len() - 1]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(WireError::Truncated { buffered: frame.len() - 1 }));
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut encoder = Encoder::new(key(1));
        let mut frame = encoder.encode(1, b"a").unwrap();
        frame[7] = 0x80;
        // Re-seal so that only the flags are wrong.
        let covered = frame.len() - TRAILER_BYTES;
        let crc = crc32c::crc32c(&frame[..covered]);
        let tag = key(1).tag(&frame[..covered]);
        frame.truncate(covered);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&tag);
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        assert_eq!(decoder.next_frame(), Err(WireError::UnknownFlags { seq: 0, flags: 0x80 }));
    }

    #[test]
    fn session_keys_differ_per_connection_and_direction() {
        let psk = PresharedKey::new(&[7; 32]).unwrap();
        let (a, b) = ([1; NONCE_BYTES], [2; NONCE_BYTES]);
        let frame = Encoder::new(psk.session_key(Direction::PrimaryToBackup, &a, &b)).encode(1, b"x").unwrap();
        for other in [
            psk.session_key(Direction::BackupToPrimary, &a, &b),
            psk.session_key(Direction::PrimaryToBackup, &a, &[3; NONCE_BYTES]),
            psk.hello_key(Direction::PrimaryToBackup),
        ] {
            let mut decoder = Decoder::new(other);
            decoder.push(&frame);
            assert_eq!(decoder.next_frame(), Err(WireError::WrongKey));
        }
    }

    #[test]
    fn short_keys_are_refused_and_keys_are_never_printed() {
        assert_eq!(PresharedKey::new(b"short").unwrap_err(), KeyError::TooShort { length: 5 });
        let psk = PresharedKey::new(b"0123456789abcdefSECRET").unwrap();
        assert!(!format!("{psk:?}").contains("SECRET"));
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_by_the_encoder() {
        let payload = vec![0; MAX_PAYLOAD_BYTES as usize + 1];
        assert!(matches!(Encoder::new(key(1)).encode(1, &payload), Err(WireError::PayloadTooLarge { .. })));
    }
}
