//! The frame format of the replication channel: versioned, length-prefixed, checksummed and
//! sealed frames (ChaCha20-Poly1305: encrypted and authenticated), an [`Encoder`] that numbers
//! them and a streaming [`Decoder`] that checks everything before it trusts anything.
//!
//! ```text
//!  0      4        6      7       8              16          20
//!  +------+--------+------+-------+--------------+-----------+---------+------------+-----+--------+
//!  | FTVR | version| type | flags | sequence u64 | length u32| (nonce) | ciphertext | tag | CRC32C |
//!  +------+--------+------+-------+--------------+-----------+---------+------------+-----+--------+
//!          u16 LE                  LE             LE          12 bytes  `length`     16 B  LE u32
//! ```
//!
//! The payload is sealed with ChaCha20-Poly1305 (RFC 8439): the header is the associated data,
//! so it is authenticated too, and the Poly1305 tag follows the ciphertext. The CRC32C covers
//! every byte before it (header, nonce, ciphertext, tag) and is checked first: it tells line
//! noise (or a bug) from a forgery, since a frame whose CRC holds but whose tag does not was
//! sealed with another key.
//!
//! No nonce is ever used twice under one key. Frames under a session key (every frame after
//! the handshake) take their nonce from the direction and the sequence number, implicitly:
//! session keys are fresh per connection and per direction, and sequence numbers never repeat
//! on a connection. The handshake key is the same on every connection, so its frames (flag
//! [`FLAG_EXPLICIT_NONCE`]) carry a synthetic nonce, a keyed hash of header and payload (the
//! SIV construction): it differs whenever the frame differs, and every Hello carries fresh
//! random bytes.
//!
//! A connection's first frame may carry at most [`MAX_FIRST_PAYLOAD_BYTES`]: until a frame has
//! been authenticated, a stranger cannot make the decoder buffer more. Sequence numbers start
//! at 0 on each connection, per direction, and go up by exactly one, so a lost, duplicated or
//! reordered frame is caught here. Keys are per direction and, after the handshake, per
//! connection (see [`PresharedKey::session_key`]), so a frame recorded on one connection cannot
//! be replayed into another nor reflected back to its sender.
//!
//! Damage in transit need not cost the connection. Once a link is past its handshake, its
//! encoder keeps the frames it sent, up to [`RESEND_WINDOW_BYTES`] ([`Encoder::keep_for_resend`]),
//! and its decoder recovers from a damaged payload ([`Decoder::recover_damaged_frames`]): a
//! frame whose header checks out (so its length, and where the next frame begins, can be
//! trusted) but whose payload fails its CRC32C or its authentication is skipped, unused, and
//! reported as [`Decoded::Damaged`]; the frames after it are skipped unread until it comes
//! again, and the receiver asks the sender to send everything again from that sequence number
//! (go-back-N; [`Encoder::resend_from`] gives the very bytes sent the first time). A resent
//! frame is the same ciphertext under the same nonce, so nothing new is revealed; every frame
//! is still accepted once, in sequence, and only after its tag checks out, so neither a forged
//! nor a replayed frame is ever used. A damaged header means the framing is lost: that, as
//! every other error, is final for the connection.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// The four bytes every frame begins with.
pub const MAGIC: [u8; 4] = *b"FTVR";
/// The version of the frame format this crate reads and writes (1 was HMAC-SHA256, in clear;
/// 2 had no checksum of its own on the header).
pub const WIRE_VERSION: u16 = 3;
/// Bytes before the nonce or payload: magic, version, type, flags, sequence, length, and a
/// CRC32C of those. The header's own checksum is checked before its length is trusted: a
/// length damaged in transit would otherwise make the receiver wait for bytes that never
/// come (up to [`MAX_PAYLOAD_BYTES`] of them), while the sender's frames pile up behind.
pub const HEADER_BYTES: usize = 24;
/// Where the header's CRC32C sits (it covers the bytes before it).
const HEADER_CRC_AT: usize = 20;
/// Bytes after the payload: the Poly1305 tag and the CRC32C.
pub const TRAILER_BYTES: usize = TAG_BYTES + CRC_BYTES;
/// Bytes of the nonce a frame flagged [`FLAG_EXPLICIT_NONCE`] carries after its header.
pub const EXPLICIT_NONCE_BYTES: usize = 12;
/// The frame carries its nonce (a handshake frame); otherwise it follows from the sequence.
pub const FLAG_EXPLICIT_NONCE: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_EXPLICIT_NONCE;
const TAG_BYTES: usize = 16;
const CRC_BYTES: usize = 4;
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
/// The most an encoder keeps of the frames it sent, for resending; and so the most a decoder
/// skips while it waits for a damaged frame to come again (every frame it skips was sent
/// after that one, and the sender must still hold them all to resend them).
pub const RESEND_WINDOW_BYTES: usize = 64 << 20;
/// Damaged arrivals of the frame due, one after the other with no good frame between, after
/// which the decoder gives up on the connection: line noise does not strike every copy.
pub const MAX_DAMAGED_IN_A_ROW: u32 = 8;
/// Frames out of turn are opened ([`Decoded::Ahead`]) up to this payload: requests to resend
/// and heartbeats, not checkpoint chunks.
pub const MAX_AHEAD_PAYLOAD_BYTES: u32 = 64;

const _: () = assert!(HEADER_BYTES == 4 + 2 + 1 + 1 + 8 + 4 + 4 && HEADER_CRC_AT + 4 == HEADER_BYTES);
const _: () = assert!(MAX_FIRST_PAYLOAD_BYTES <= MAX_PAYLOAD_BYTES);
const _: () =
    assert!((MAX_PAYLOAD_BYTES as usize) + HEADER_BYTES + EXPLICIT_NONCE_BYTES + TRAILER_BYTES < u32::MAX as usize);
// ChaCha20-Poly1305 seals at most 2^38 - 64 bytes under one nonce; a payload is far below.
const _: () = assert!((MAX_PAYLOAD_BYTES as u64) < (1 << 38) - 64);

/// A handshake nonce, chosen at random by each side for each connection.
pub type Nonce = [u8; NONCE_BYTES];

type HmacSha256 = Hmac<Sha256>;
type AeadNonce = chacha20poly1305::Nonce;

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
        "the header of frame {seq} failed its CRC32C checksum: it was corrupted in transit, and with it \
         where the frames after it begin"
    )]
    BadHeaderChecksum { seq: u64 },
    #[error(
        "the peer's first frame failed authentication: the two sides use different \
         pre-shared keys (give both the same --key FILE)"
    )]
    WrongKey,
    #[error(
        "frame {seq} failed authentication: it was forged, replayed from another \
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
    #[error(
        "the peer asked for frame {seq} again, but only frames from {oldest:?} on are kept for resending: \
         more was in flight than the resend window holds"
    )]
    ResendUnavailable { seq: u64, oldest: Option<u64> },
    #[error("the peer asked for frame {seq} again, but only frames up to {sent:?} were sent")]
    ResendOfUnsentFrame { seq: u64, sent: Option<u64> },
    #[error(
        "frame {seq} arrived damaged and was asked for again, but {skipped_bytes} bytes of later frames came \
         instead, more than the sender can hold for resending"
    )]
    ResendOverdue { seq: u64, skipped_bytes: u64 },
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

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
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

    /// The key of the handshake frames (the first frame each way on a connection). It is the
    /// same on every connection, so its frames carry a synthetic nonce.
    pub fn hello_key(&self, direction: Direction) -> FrameKey {
        let secret = hmac_sha256(&self.0, &[b"ftvr/2 hello", &[direction.label()]]);
        let siv = <HmacSha256 as Mac>::new_from_slice(&hmac_sha256(&secret, &[b"ftvr/2 synthetic nonce"]))
            .expect("HMAC accepts keys of any length");
        FrameKey { nonces: NonceSource::Synthetic(siv), ..FrameKey::from_secret(&secret) }
    }

    /// The key of every frame after the handshake: bound to both sides' nonces, so frames
    /// of one connection fail authentication on any other.
    pub fn session_key(&self, direction: Direction, primary_nonce: &Nonce, backup_nonce: &Nonce) -> FrameKey {
        let label = direction.label();
        let secret = hmac_sha256(&self.0, &[b"ftvr/2 session", &[label], primary_nonce, backup_nonce]);
        FrameKey { nonces: NonceSource::Sequence { direction: label }, ..FrameKey::from_secret(&secret) }
    }
}

/// A sealing key: a ChaCha20-Poly1305 key and where each frame's nonce comes from.
#[derive(Clone)]
pub struct FrameKey {
    cipher: ChaCha20Poly1305,
    nonces: NonceSource,
}

#[derive(Clone)]
enum NonceSource {
    /// Direction and sequence number: for keys used on one connection only.
    Sequence { direction: u8 },
    /// A keyed hash of header and payload, carried in the frame: for keys used on many.
    Synthetic(HmacSha256),
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(redacted)")
    }
}

impl FrameKey {
    /// A frame key from secret bytes, for one connection's frames in one direction (tests and
    /// tools; the protocol derives its keys).
    pub fn from_secret(secret: &[u8]) -> Self {
        let key = hmac_sha256(secret, &[b"ftvr/2 chacha20-poly1305"]);
        FrameKey { cipher: ChaCha20Poly1305::new(&key.into()), nonces: NonceSource::Sequence { direction: 0 } }
    }

    fn flags(&self) -> u8 {
        match self.nonces {
            NonceSource::Sequence { .. } => 0,
            NonceSource::Synthetic(_) => FLAG_EXPLICIT_NONCE,
        }
    }

    /// The nonce of the frame with this header and plaintext (unused by a sequence nonce).
    fn nonce(&self, header: &[u8; HEADER_BYTES], seq: u64, plaintext: &[u8]) -> AeadNonce {
        let mut nonce = AeadNonce::default();
        match &self.nonces {
            NonceSource::Sequence { direction } => {
                nonce[0] = *direction;
                nonce[4..].copy_from_slice(&seq.to_le_bytes());
            }
            NonceSource::Synthetic(siv) => {
                let mut mac = siv.clone();
                mac.update(header);
                mac.update(plaintext);
                nonce.copy_from_slice(&mac.finalize().into_bytes()[..EXPLICIT_NONCE_BYTES]);
            }
        }
        nonce
    }
}

/// One decoded frame: its type, its sequence number and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub frame_type: u8,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What [`Decoder::next_decoded`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, verified frame, the next in sequence.
    Frame(Frame),
    /// Frame `seq` arrived with a sound header but a payload that failed its checksum or its
    /// authentication (`error`): it was skipped unused, and so is every frame after it until
    /// it comes again. Ask the sender to resend from `seq`.
    Damaged { seq: u64, error: WireError },
    /// A small frame from after the damaged one, authentic but out of turn, while the decoder
    /// waits for the damaged one: it will come again in its turn. Use it only for what may be
    /// done twice (serving a request to resend; a sign of life).
    Ahead(Frame),
}

/// Turns payloads into frames, numbering them.
#[derive(Debug, Clone)]
pub struct Encoder {
    key: FrameKey,
    next_seq: u64,
    /// The frames sent, oldest first, once [`Encoder::keep_for_resend`] was called.
    kept: Option<Kept>,
}

#[derive(Debug, Default, Clone)]
struct Kept {
    frames: std::collections::VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    limit_bytes: usize,
}

impl Encoder {
    pub fn new(key: FrameKey) -> Self {
        Encoder { key, next_seq: 0, kept: None }
    }

    /// Changes the key of the frames encoded from now on (after the handshake).
    pub fn set_key(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// Keep a copy of every frame encoded from now on, the newest `limit_bytes` of them (at
    /// most [`RESEND_WINDOW_BYTES`]), so that [`Encoder::resend_from`] can send them again.
    pub fn keep_for_resend(&mut self, limit_bytes: usize) {
        assert!(limit_bytes <= RESEND_WINDOW_BYTES, "the peer skips at most RESEND_WINDOW_BYTES");
        self.kept = Some(Kept { limit_bytes, ..Kept::default() });
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The kept frames from `seq` on, in order, exactly as they were sent the first time.
    pub fn resend_from(&self, seq: u64) -> Result<Vec<Vec<u8>>, WireError> {
        let sent = self.next_seq.checked_sub(1);
        if Some(seq) > sent {
            return Err(WireError::ResendOfUnsentFrame { seq, sent });
        }
        let frames = self.kept.as_ref().map(|k| &k.frames);
        let oldest = frames.and_then(|f| f.front()).map(|(s, _)| *s);
        let Some(frames) = frames.filter(|_| oldest.is_some_and(|o| o <= seq)) else {
            return Err(WireError::ResendUnavailable { seq, oldest });
        };
        Ok(frames.iter().filter(|(s, _)| *s >= seq).map(|(_, f)| f.clone()).collect())
    }

    fn keep(&mut self, seq: u64, frame: &[u8]) {
        let Some(kept) = &mut self.kept else { return };
        kept.frames.push_back((seq, frame.to_vec()));
        kept.bytes += frame.len();
        while kept.bytes > kept.limit_bytes {
            let (_, old) = kept.frames.pop_front().expect("bytes are counted in frames");
            kept.bytes -= old.len();
        }
    }

    /// The whole frame for `payload`, with the next sequence number.
    pub fn encode(&mut self, frame_type: u8, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&n| n <= MAX_PAYLOAD_BYTES)
            .ok_or(WireError::PayloadTooLarge { length: payload.len(), limit: MAX_PAYLOAD_BYTES })?;
        let header = Header { version: WIRE_VERSION, frame_type, flags: self.key.flags(), seq: self.next_seq, length };
        let frame = seal(&self.key, &header, payload);
        self.keep(self.next_seq, &frame);
        self.next_seq += 1;
        Ok(frame)
    }
}

/// Header, nonce if it travels, ciphertext, tag and CRC32C.
fn seal(key: &FrameKey, header: &Header, payload: &[u8]) -> Vec<u8> {
    let header_bytes = header.write();
    let nonce = key.nonce(&header_bytes, header.seq, payload);
    let mut frame = Vec::with_capacity(HEADER_BYTES + EXPLICIT_NONCE_BYTES + payload.len() + TRAILER_BYTES);
    frame.extend_from_slice(&header_bytes);
    if header.flags & FLAG_EXPLICIT_NONCE != 0 {
        frame.extend_from_slice(&nonce);
    }
    let body_at = frame.len();
    frame.extend_from_slice(payload);
    let tag = key
        .cipher
        .encrypt_in_place_detached(&nonce, &header_bytes, &mut frame[body_at..])
        .expect("a payload is far below the cipher's limit");
    frame.extend_from_slice(&tag);
    let crc = crc32c::crc32c(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// Reassembles frames from a byte stream cut anywhere, and checks each one.
#[derive(Debug, Clone)]
pub struct Decoder {
    key: FrameKey,
    buf: Vec<u8>,
    /// Where the next frame begins in `buf`; bytes before it are consumed.
    start: usize,
    next_seq: u64,
    failed: Option<WireError>,
    /// Set by [`Decoder::recover_damaged_frames`]: a damaged payload is skipped, not final.
    recovery: Option<Recovery>,
}

/// Where a decoder that recovers from damaged payloads stands.
#[derive(Debug, Clone)]
struct Recovery {
    /// The most to skip while awaiting the frame due: what the sender keeps for resending.
    max_skipped_bytes: u64,
    /// The frame due (`next_seq`) arrived damaged: later frames are skipped until it comes again.
    awaiting: bool,
    /// Bytes of later frames skipped while awaiting it.
    skipped_bytes: u64,
    damaged_in_a_row: u32,
    /// The first frame reported damaged on this connection: copies of frames from it on may
    /// come again (a request repeated, or served twice), and are dropped unread.
    first_requested: Option<u64>,
}

/// A header that checked out, and where its frame's parts lie.
struct Located {
    header: Header,
    explicit_nonce: bool,
    body_at: usize,
    tag_at: usize,
    crc_at: usize,
    total: usize,
}

impl Decoder {
    pub fn new(key: FrameKey) -> Self {
        Decoder { key, buf: Vec::new(), start: 0, next_seq: 0, failed: None, recovery: None }
    }

    /// Changes the key that frames decoded from now on must carry (after the handshake).
    pub fn set_key(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// From now on, a frame whose header checks out but whose payload does not is skipped and
    /// reported ([`Decoded::Damaged`]) instead of failing the stream; the sender must then
    /// resend from it. For the frames after the handshake: a connection's first frame has no
    /// sender that could resend it, and its failure says "wrong key". While it waits for the
    /// damaged frame to come again, it skips at most `max_skipped_bytes` of later frames: the
    /// sender's resend window (at most [`RESEND_WINDOW_BYTES`]).
    pub fn recover_damaged_frames(&mut self, max_skipped_bytes: usize) {
        let max_skipped_bytes = max_skipped_bytes as u64;
        self.recovery = Some(Recovery {
            max_skipped_bytes,
            awaiting: false,
            skipped_bytes: 0,
            damaged_in_a_row: 0,
            first_requested: None,
        });
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

    /// The next whole, verified frame; `Ok(None)` when more bytes are needed. Every error is
    /// final, a damaged payload included (see [`Decoder::next_decoded`] for recovering from one).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match self.next_decoded()? {
            None => Ok(None),
            Some(Decoded::Frame(frame)) => Ok(Some(frame)),
            Some(Decoded::Damaged { error, .. }) => Err(self.fail(error)),
            Some(Decoded::Ahead(_)) => unreachable!("frames come ahead only after a damaged one, made final here"),
        }
    }

    /// The next whole, verified frame, or the news that the frame due arrived damaged and was
    /// skipped (only once [`Decoder::recover_damaged_frames`] was called); `Ok(None)` when
    /// more bytes are needed. An error is final: the decoder returns it from then on.
    pub fn next_decoded(&mut self) -> Result<Option<Decoded>, WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.parse().map_err(|error| self.fail(error))
    }

    fn fail(&mut self, error: WireError) -> WireError {
        self.failed = Some(error.clone());
        self.buf = Vec::new();
        self.start = 0;
        error
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

    fn parse(&mut self) -> Result<Option<Decoded>, WireError> {
        loop {
            let Some(at) = self.locate()? else { return Ok(None) };
            let seq = at.header.seq;
            let Some(recovery) = &mut self.recovery else {
                let payload = self.open(&at, true)?;
                return Ok(Some(self.accept(at, payload)));
            };
            if recovery.awaiting && seq > self.next_seq {
                // Sent before the sender heard that the frame due was damaged: it comes again.
                // A small one is opened all the same, for what may be done twice (a request
                // to resend, a sign of life): two sides that each wait for the other's
                // resend would otherwise wait for ever.
                recovery.skipped_bytes += at.total as u64;
                if recovery.skipped_bytes > recovery.max_skipped_bytes {
                    let skipped_bytes = recovery.skipped_bytes;
                    return Err(WireError::ResendOverdue { seq: self.next_seq, skipped_bytes });
                }
                let ahead = (at.header.length <= MAX_AHEAD_PAYLOAD_BYTES).then(|| self.open(&at, false));
                self.start += at.total;
                match ahead {
                    Some(Ok(payload)) => {
                        let Header { frame_type, seq, .. } = at.header;
                        return Ok(Some(Decoded::Ahead(Frame { frame_type, seq, payload })));
                    }
                    _ => continue,
                }
            }
            if recovery.first_requested.is_some_and(|first| first <= seq) && seq < self.next_seq {
                // Sent again after this side asked: a copy of a frame already taken.
                self.start += at.total;
                continue;
            }
            return match self.open(&at, true) {
                Ok(payload) => Ok(Some(self.accept(at, payload))),
                Err(error @ (WireError::BadChecksum { .. } | WireError::BadAuthentication { .. }))
                    if seq == self.next_seq =>
                {
                    // The header checked out, so the length can be trusted: skip just this frame.
                    self.start += at.total;
                    let recovery = self.recovery.as_mut().expect("checked");
                    (recovery.awaiting, recovery.skipped_bytes) = (true, 0);
                    recovery.first_requested.get_or_insert(seq);
                    recovery.damaged_in_a_row += 1;
                    if recovery.damaged_in_a_row > MAX_DAMAGED_IN_A_ROW {
                        return Err(error);
                    }
                    Ok(Some(Decoded::Damaged { seq, error }))
                }
                Err(error) => Err(error),
            };
        }
    }

    /// The frame due, opened: it is consumed and the sequence moves on.
    fn accept(&mut self, at: Located, payload: Vec<u8>) -> Decoded {
        self.start += at.total;
        self.next_seq += 1;
        if let Some(recovery) = &mut self.recovery {
            (recovery.awaiting, recovery.skipped_bytes, recovery.damaged_in_a_row) = (false, 0, 0);
        }
        let Header { frame_type, seq, .. } = at.header;
        Decoded::Frame(Frame { frame_type, seq, payload })
    }

    /// The frame due, if the last one reported [`Decoded::Damaged`] and it has not come since.
    pub fn awaiting_resend(&self) -> Option<u64> {
        self.recovery.as_ref().filter(|r| r.awaiting).map(|_| self.next_seq)
    }

    /// The next frame's header, checked, once the whole frame has arrived.
    fn locate(&self) -> Result<Option<Located>, WireError> {
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
        let header_bytes: &[u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().expect("header length");
        let header = Header::read(header_bytes);
        // The version first: it sits at the same place in every version of the format, and
        // another version's header need not carry this one's checksum.
        if header.version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { theirs: header.version, ours: WIRE_VERSION });
        }
        let header_crc = u32::from_le_bytes(header_bytes[HEADER_CRC_AT..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&header_bytes[..HEADER_CRC_AT]) != header_crc {
            // The sequence number read is as damaged as the rest: name the frame due.
            return Err(WireError::BadHeaderChecksum { seq: self.next_seq });
        }
        let limit = match self.next_seq {
            0 => MAX_FIRST_PAYLOAD_BYTES,
            _ => MAX_PAYLOAD_BYTES,
        };
        if header.length > limit {
            return Err(WireError::Oversized { length: header.length.into(), limit });
        }
        let explicit_nonce = header.flags & FLAG_EXPLICIT_NONCE != 0;
        let body_at = HEADER_BYTES + if explicit_nonce { EXPLICIT_NONCE_BYTES } else { 0 };
        let tag_at = body_at + header.length as usize;
        let crc_at = tag_at + TAG_BYTES;
        let total = crc_at + CRC_BYTES;
        if bytes.len() < total {
            return Ok(None);
        }
        Ok(Some(Located { header, explicit_nonce, body_at, tag_at, crc_at, total }))
    }

    /// The payload of the located frame, once its CRC32C, its tag, its place in the
    /// sequence (when `in_turn`) and its flags all check out.
    fn open(&self, at: &Located, in_turn: bool) -> Result<Vec<u8>, WireError> {
        let bytes = &self.buf[self.start..self.start + at.total];
        let header_bytes: &[u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().expect("header length");
        let header = &at.header;
        let crc = u32::from_le_bytes(bytes[at.crc_at..].try_into().expect("crc length"));
        if crc32c::crc32c(&bytes[..at.crc_at]) != crc {
            return Err(WireError::BadChecksum { seq: header.seq });
        }
        let failed_authentication = match self.next_seq {
            0 => WireError::WrongKey,
            _ => WireError::BadAuthentication { seq: header.seq },
        };
        // A frame sealed under the other kind of key (handshake or session) is not ours.
        if at.explicit_nonce != (self.key.flags() & FLAG_EXPLICIT_NONCE != 0) {
            return Err(failed_authentication);
        }
        let nonce = match at.explicit_nonce {
            true => *AeadNonce::from_slice(&bytes[HEADER_BYTES..at.body_at]),
            false => self.key.nonce(header_bytes, header.seq, &[]),
        };
        let mut payload = bytes[at.body_at..at.tag_at].to_vec();
        let tag = chacha20poly1305::Tag::from_slice(&bytes[at.tag_at..at.crc_at]);
        if self.key.cipher.decrypt_in_place_detached(&nonce, header_bytes, &mut payload, tag).is_err() {
            return Err(failed_authentication);
        }
        if in_turn && header.seq != self.next_seq {
            return Err(WireError::OutOfOrder { expected: self.next_seq, found: header.seq });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::UnknownFlags { seq: header.seq, flags: header.flags });
        }
        Ok(payload)
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

    fn write(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0; HEADER_BYTES];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&self.version.to_le_bytes());
        bytes[6] = self.frame_type;
        bytes[7] = self.flags;
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.length.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..HEADER_CRC_AT]);
        bytes[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        bytes
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
        frame[4] = 1;
        let mut decoder = Decoder::new(key(1));
        decoder.push(&frame);
        assert_eq!(decoder.next_frame(), Err(WireError::UnsupportedVersion { theirs: 1, ours: 3 }));
        assert_eq!(
            WireError::UnsupportedVersion { theirs: 1, ours: 3 }.to_string(),
            "the peer speaks replication wire version 1, this ftvm speaks version 3: run the same ftvm release on \
             both sides"
        );
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"").unwrap();
        let mut header = encoder.encode(1, b"").unwrap();
        header[16..20].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
        fix_crc(&mut header); // a sender that means it, not line noise
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

    /// Recomputes the CRC32C after a deliberate change, as a forger would.
    /// Makes both checksums match again (what a forger can always do).
    fn fix_crc(frame: &mut [u8]) {
        let header_crc = crc32c::crc32c(&frame[..HEADER_CRC_AT]);
        frame[HEADER_CRC_AT..HEADER_BYTES].copy_from_slice(&header_crc.to_le_bytes());
        let crc_at = frame.len() - CRC_BYTES;
        let crc = crc32c::crc32c(&frame[..crc_at]);
        frame[crc_at..].copy_from_slice(&crc.to_le_bytes());
    }

    fn first_error(frames: &[&[u8]], key: FrameKey) -> WireError {
        let mut decoder = Decoder::new(key);
        for frame in frames {
            decoder.push(frame);
        }
        decode_all(&mut decoder).unwrap_err()
    }

    #[test]
    fn the_payload_travels_encrypted() {
        let secret = b"guest RAM: the password is hunter2, and it must not cross the wire in clear";
        let psk = PresharedKey::new(&[7; 32]).unwrap();
        let (a, b) = ([1; NONCE_BYTES], [2; NONCE_BYTES]);
        for key in
            [key(1), psk.hello_key(Direction::PrimaryToBackup), psk.session_key(Direction::PrimaryToBackup, &a, &b)]
        {
            let frame = Encoder::new(key).encode(1, secret).unwrap();
            assert!(!frame.windows(8).any(|w| secret.windows(8).any(|s| s == w)), "8 plaintext bytes in clear");
        }
    }

    #[test]
    fn session_frames_take_their_nonce_from_the_sequence_number() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"same payload").unwrap();
        let second = encoder.encode(1, b"same payload").unwrap();
        assert_eq!(first.len(), HEADER_BYTES + 12 + TRAILER_BYTES, "no nonce travels");
        assert_eq!(first[7], 0, "no flags");
        assert_ne!(first[HEADER_BYTES..HEADER_BYTES + 12], second[HEADER_BYTES..HEADER_BYTES + 12]);
    }

    #[test]
    fn handshake_frames_carry_a_nonce_that_differs_when_the_frame_does() {
        let psk = PresharedKey::new(&[7; 32]).unwrap();
        let hello =
            |payload: &[u8]| Encoder::new(psk.hello_key(Direction::PrimaryToBackup)).encode(1, payload).unwrap();
        let (one, other, again) = (hello(b"nonce 1"), hello(b"nonce 2"), hello(b"nonce 1"));
        assert_eq!(one.len(), HEADER_BYTES + EXPLICIT_NONCE_BYTES + 7 + TRAILER_BYTES);
        assert_eq!(one[7], FLAG_EXPLICIT_NONCE);
        let nonce = |frame: &[u8]| frame[HEADER_BYTES..HEADER_BYTES + EXPLICIT_NONCE_BYTES].to_vec();
        assert_ne!(nonce(&one), nonce(&other), "two different frames under one key share a nonce");
        assert_eq!(one, again, "the same frame seals the same (the nonce is synthetic, not random)");
        let mut decoder = Decoder::new(psk.hello_key(Direction::PrimaryToBackup));
        decoder.push(&one);
        assert_eq!(decoder.next_frame().unwrap().map(|f| f.payload), Some(b"nonce 1".to_vec()));
    }

    #[test]
    fn a_frame_under_the_other_kind_of_key_is_a_wrong_key() {
        let psk = PresharedKey::new(&[7; 32]).unwrap();
        let (a, b) = ([1; NONCE_BYTES], [2; NONCE_BYTES]);
        let session = psk.session_key(Direction::PrimaryToBackup, &a, &b);
        let hello = psk.hello_key(Direction::PrimaryToBackup);
        let hello_frame = Encoder::new(hello.clone()).encode(1, b"x").unwrap();
        let session_frame = Encoder::new(session.clone()).encode(1, b"x").unwrap();
        assert_eq!(first_error(&[&hello_frame], session), WireError::WrongKey);
        assert_eq!(first_error(&[&session_frame], hello), WireError::WrongKey);
    }

    #[test]
    fn corruption_fails_the_checksum_and_forgery_fails_authentication() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"a").unwrap();
        let second = encoder.encode(1, b"payload").unwrap();
        // Any byte but the magic and version (which have their own errors), corrupted in
        // transit: type, flags, sequence number, length, the header's CRC; ciphertext, tag, the
        // frame's CRC. A damaged header's sequence number means nothing: the frame due is named.
        for at in 6..HEADER_BYTES {
            let mut corrupted = second.clone();
            corrupted[at] ^= 0x04;
            assert_eq!(first_error(&[&first, &corrupted], key(1)), WireError::BadHeaderChecksum { seq: 1 }, "{at}");
        }
        for at in HEADER_BYTES..second.len() {
            let mut corrupted = second.clone();
            corrupted[at] ^= 0x04;
            assert_eq!(first_error(&[&first, &corrupted], key(1)), WireError::BadChecksum { seq: 1 }, "byte {at}");
        }
        // The same changes with the CRC32C made to match: only the tag catches them.
        for at in [6, 8, HEADER_BYTES, HEADER_BYTES + 6, second.len() - CRC_BYTES - 1] {
            let mut forged = second.clone();
            forged[at] ^= 0x04;
            fix_crc(&mut forged);
            let seq = u64::from_le_bytes(forged[8..16].try_into().unwrap());
            assert_eq!(first_error(&[&first, &forged], key(1)), WireError::BadAuthentication { seq }, "byte {at}");
        }
    }
    #[test]
    fn a_damaged_length_is_refused_at_the_header_without_waiting_for_the_payload() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(1, b"a").unwrap();
        let mut second = encoder.encode(1, b"payload").unwrap();
        second[17] ^= 0x40; // the length now says about 4 MiB more
        let mut decoder = Decoder::new(key(1));
        decoder.push(&first);
        decoder.push(&second[..HEADER_BYTES]);
        assert!(decoder.next_frame().unwrap().is_some());
        assert_eq!(decoder.next_frame(), Err(WireError::BadHeaderChecksum { seq: 1 }));
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
        // Sealed properly, so that only the flags are wrong.
        let header = Header { version: WIRE_VERSION, frame_type: 1, flags: 0x80, seq: 0, length: 1 };
        let frame = seal(&key(1), &header, b"a");
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

    /// A decoder past its handshake, and the encoder that feeds it, both recovering.
    fn recovering_pair(window_bytes: usize) -> (Encoder, Decoder) {
        let mut encoder = Encoder::new(key(1));
        encoder.keep_for_resend(window_bytes);
        let mut decoder = Decoder::new(key(1));
        decoder.recover_damaged_frames(window_bytes);
        // The first frame of a connection is never recovered: get it out of the way.
        decoder.push(&encoder.encode(1, b"hello").unwrap());
        assert!(matches!(decoder.next_decoded(), Ok(Some(Decoded::Frame(_)))));
        (encoder, decoder)
    }

    fn payload_of(decoded: Option<Decoded>) -> Vec<u8> {
        match decoded {
            Some(Decoded::Frame(frame)) => frame.payload,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_payload_is_skipped_and_so_are_later_frames_until_it_is_resent() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let frames: Vec<Vec<u8>> = (1..=3u8).map(|i| encoder.encode(5, &[i; 100]).unwrap()).collect();
        let mut damaged = frames[0].clone();
        damaged[HEADER_BYTES + 3] ^= 0x20;
        for frame in [&damaged, &frames[1], &frames[2]] {
            decoder.push(frame);
        }
        assert_eq!(
            decoder.next_decoded(),
            Ok(Some(Decoded::Damaged { seq: 1, error: WireError::BadChecksum { seq: 1 } }))
        );
        assert_eq!(decoder.next_decoded(), Ok(None), "frames 2 and 3 wait for frame 1");
        assert_eq!(decoder.buffered_len(), 0, "skipped, not buffered");
        let resent = encoder.resend_from(1).unwrap();
        assert_eq!(resent, frames, "the very bytes sent the first time");
        for frame in &resent {
            decoder.push(frame);
        }
        for i in 1..=3u8 {
            assert_eq!(payload_of(decoder.next_decoded().unwrap()), vec![i; 100]);
        }
        assert_eq!(decoder.next_decoded(), Ok(None));
    }

    #[test]
    fn small_frames_after_a_damaged_one_are_opened_ahead_and_their_copies_dropped_in_turn() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let mut damaged = encoder.encode(5, &[1; 100]).unwrap();
        damaged[HEADER_BYTES] ^= 0x01;
        let small = encoder.encode(6, b"resend from 7").unwrap();
        let mut small_damaged = encoder.encode(6, b"heartbeat").unwrap();
        small_damaged[HEADER_BYTES] ^= 0x01;
        for frame in [&damaged, &small, &small_damaged] {
            decoder.push(frame);
        }
        assert!(matches!(decoder.next_decoded(), Ok(Some(Decoded::Damaged { seq: 1, .. }))));
        assert_eq!(decoder.awaiting_resend(), Some(1));
        let ahead = Frame { frame_type: 6, seq: 2, payload: b"resend from 7".to_vec() };
        assert_eq!(decoder.next_decoded(), Ok(Some(Decoded::Ahead(ahead))));
        assert_eq!(decoder.next_decoded(), Ok(None), "a damaged frame ahead is skipped: it comes again");
        // Served twice (asked again, say): the second copies are dropped unread.
        let resent = encoder.resend_from(1).unwrap();
        for frame in resent.iter().chain(&resent) {
            decoder.push(frame);
        }
        let seqs: Vec<u64> = std::iter::from_fn(|| decoder.next_decoded().unwrap())
            .map(|d| match d {
                Decoded::Frame(frame) => frame.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(decoder.awaiting_resend(), None);
    }

    #[test]
    fn a_forged_payload_is_skipped_unused_and_asked_for_again() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let genuine = encoder.encode(5, b"genuine").unwrap();
        let mut forged = genuine.clone();
        forged[HEADER_BYTES] ^= 0x01;
        fix_crc(&mut forged); // passes the CRC32C: only the tag catches it
        decoder.push(&forged);
        assert_eq!(
            decoder.next_decoded(),
            Ok(Some(Decoded::Damaged { seq: 1, error: WireError::BadAuthentication { seq: 1 } }))
        );
        decoder.push(&genuine);
        assert_eq!(payload_of(decoder.next_decoded().unwrap()), b"genuine".to_vec());
    }

    #[test]
    fn a_damaged_header_is_final_even_when_recovering() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let mut frame = encoder.encode(5, b"payload").unwrap();
        frame[17] ^= 0x01; // the length: where the next frame begins is lost
        decoder.push(&frame);
        decoder.push(&encoder.encode(5, b"next").unwrap());
        assert_eq!(decoder.next_decoded(), Err(WireError::BadHeaderChecksum { seq: 1 }));
        assert_eq!(decoder.next_decoded(), Err(WireError::BadHeaderChecksum { seq: 1 }), "final");
    }

    #[test]
    fn a_replayed_frame_is_refused_while_recovering_too() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let first = encoder.encode(5, b"first").unwrap();
        decoder.push(&first);
        assert_eq!(payload_of(decoder.next_decoded().unwrap()), b"first".to_vec());
        let mut damaged = encoder.encode(5, b"second").unwrap();
        damaged[HEADER_BYTES] ^= 0x01;
        decoder.push(&damaged);
        assert!(matches!(decoder.next_decoded(), Ok(Some(Decoded::Damaged { seq: 2, .. }))));
        decoder.push(&first);
        assert_eq!(decoder.next_decoded(), Err(WireError::OutOfOrder { expected: 2, found: 1 }));
    }

    #[test]
    fn a_frame_damaged_again_and_again_ends_the_stream() {
        let (mut encoder, mut decoder) = recovering_pair(1 << 20);
        let mut damaged = encoder.encode(5, b"payload").unwrap();
        damaged[HEADER_BYTES] ^= 0x01;
        for _ in 0..MAX_DAMAGED_IN_A_ROW {
            decoder.push(&damaged);
            assert!(matches!(decoder.next_decoded(), Ok(Some(Decoded::Damaged { seq: 1, .. }))));
        }
        decoder.push(&damaged);
        assert_eq!(decoder.next_decoded(), Err(WireError::BadChecksum { seq: 1 }));
    }

    #[test]
    fn a_decoder_skips_no_more_than_the_resend_window_while_it_waits() {
        let (mut encoder, mut decoder) = recovering_pair(200);
        let mut damaged = encoder.encode(5, &[0; 10]).unwrap();
        damaged[HEADER_BYTES] ^= 0x01;
        decoder.push(&damaged);
        assert!(matches!(decoder.next_decoded(), Ok(Some(Decoded::Damaged { seq: 1, .. }))));
        let later = encoder.encode(5, &[0; 100]).unwrap(); // 144 bytes
        decoder.push(&later);
        assert_eq!(decoder.next_decoded(), Ok(None));
        decoder.push(&encoder.encode(5, &[0; 100]).unwrap());
        assert_eq!(decoder.next_decoded(), Err(WireError::ResendOverdue { seq: 1, skipped_bytes: 288 }));
    }

    #[test]
    fn an_encoder_keeps_only_its_window_and_resends_nothing_it_did_not_send() {
        let mut encoder = Encoder::new(key(1));
        encoder.encode(5, b"before keeping").unwrap(); // seq 0: never kept
        encoder.keep_for_resend(150);
        for _ in 0..3 {
            encoder.encode(5, &[0; 60]).unwrap(); // 104 bytes each: only the newest fits
        }
        assert_eq!(encoder.resend_from(3).map(|f| f.len()), Ok(1));
        assert_eq!(encoder.resend_from(2), Err(WireError::ResendUnavailable { seq: 2, oldest: Some(3) }));
        assert_eq!(encoder.resend_from(0), Err(WireError::ResendUnavailable { seq: 0, oldest: Some(3) }));
        assert_eq!(encoder.resend_from(4), Err(WireError::ResendOfUnsentFrame { seq: 4, sent: Some(3) }));
    }

    #[test]
    fn without_recovery_a_damaged_payload_is_final() {
        let mut encoder = Encoder::new(key(1));
        let first = encoder.encode(5, b"a").unwrap();
        let mut second = encoder.encode(5, b"payload").unwrap();
        second[HEADER_BYTES] ^= 0x01;
        let mut decoder = Decoder::new(key(1));
        decoder.push(&first);
        decoder.push(&second);
        assert!(decoder.next_decoded().unwrap().is_some());
        assert_eq!(decoder.next_decoded(), Err(WireError::BadChecksum { seq: 1 }));
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_by_the_encoder() {
        let payload = vec![0; MAX_PAYLOAD_BYTES as usize + 1];
        assert!(matches!(Encoder::new(key(1)).encode(1, &payload), Err(WireError::PayloadTooLarge { .. })));
    }
}
