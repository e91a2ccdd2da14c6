//! The two state machines wired back to back, event by event, with an ownership store.

use super::*;
use crate::messages::{CheckpointId, ConfigDigest, Message, Role, PROTOCOL_VERSION};
use crate::wire::{Direction, Encoder, Nonce, PresharedKey, WireError};

const DIGEST: ConfigDigest = [9; 32];
const RUN: u64 = 77;
const P_NONCE: Nonce = [1; 16];
const B_NONCE: Nonce = [2; 16];

fn psk() -> PresharedKey {
    PresharedKey::new(&[42; 32]).unwrap()
}

fn primary_config() -> PrimaryConfig {
    PrimaryConfig { chunk_bytes: 4, ..PrimaryConfig::new(psk(), DIGEST, RUN) }
}

fn backup_config() -> BackupConfig {
    BackupConfig::new(psk(), DIGEST, 1024)
}

/// The ownership record both replicas swap, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    generation: u64,
    owner: &'static str,
    ended: Option<u32>,
}

impl Record {
    fn swap(&mut self, expected: u64, owner: &'static str, ended: Option<u32>) -> SwapAnswer {
        if self.generation != expected {
            return SwapAnswer::Conflict {
                generation: Some(self.generation),
                owner: self.owner.into(),
                ended: self.ended,
            };
        }
        *self = Record { generation: expected + 1, owner, ended };
        SwapAnswer::Swapped { generation: expected + 1 }
    }
}

/// A primary and a backup joined by a perfect wire; the backup's machine applies at once.
struct World {
    p: Primary,
    b: Backup,
    conn: ConnId,
    connected: bool,
    to_b: Vec<u8>,
    to_p: Vec<u8>,
    p_log: Vec<PrimaryAction>,
    b_log: Vec<BackupAction>,
    applied: Vec<(u64, Option<u64>, Vec<u8>)>,
    record: Record,
    now_ms: u64,
    /// Applies wait in `deferred` until [`World::apply_deferred`] (a slow machine).
    defer_applies: bool,
    deferred: Vec<u64>,
}

impl World {
    fn new() -> Self {
        Self::with(primary_config(), backup_config())
    }

    fn new_connected() -> Self {
        let mut w = Self::new();
        w.connect();
        w
    }

    fn with(p: PrimaryConfig, b: BackupConfig) -> Self {
        World {
            p: Primary::new(p, 1, 0),
            b: Backup::new(b, 0),
            conn: 0,
            connected: false,
            to_b: Vec::new(),
            to_p: Vec::new(),
            p_log: Vec::new(),
            b_log: Vec::new(),
            applied: Vec::new(),
            record: Record { generation: 1, owner: "primary", ended: None },
            now_ms: 0,
            defer_applies: false,
            deferred: Vec::new(),
        }
    }

    fn on_p(&mut self, actions: Vec<PrimaryAction>) {
        for action in actions {
            match action {
                PrimaryAction::Send(bytes) if self.connected => self.to_b.extend(bytes),
                PrimaryAction::Send(_) => {}
                PrimaryAction::SwapGeneration { expected, ended } => {
                    let answer = self.record.swap(expected, "primary", ended);
                    self.p_log.push(PrimaryAction::SwapGeneration { expected, ended });
                    let more = self.p.step(PrimaryEvent::Swap(Ok(answer)));
                    self.on_p(more);
                }
                PrimaryAction::ReadOwnership => {
                    let r = &self.record;
                    let view = RecordView { generation: r.generation, owner: r.owner.into(), ended: r.ended };
                    let more = self.p.step(PrimaryEvent::Ownership(Ok(Some(view))));
                    self.on_p(more);
                }
                other => self.p_log.push(other),
            }
        }
    }

    fn on_b(&mut self, actions: Vec<BackupAction>) {
        for action in actions {
            match action {
                BackupAction::Send { conn, bytes } if conn == self.conn && self.connected => self.to_p.extend(bytes),
                BackupAction::Send { .. } => {}
                BackupAction::ApplyCheckpoint { epoch, base_epoch, payload, .. } => {
                    self.applied.push((epoch, base_epoch, payload));
                    if self.defer_applies {
                        self.deferred.push(epoch);
                    } else {
                        let more = self.b.step(BackupEvent::CheckpointApplied { epoch });
                        self.on_b(more);
                    }
                }
                BackupAction::ReadOwnership => {
                    let r = &self.record;
                    let view = RecordView { generation: r.generation, owner: r.owner.into(), ended: r.ended };
                    let more = self.b.step(BackupEvent::Ownership(Ok(Some(view))));
                    self.on_b(more);
                }
                BackupAction::ClaimOwnership { generation } => {
                    self.b_log.push(BackupAction::ClaimOwnership { generation });
                    let answer = self.record.swap(generation, "backup", None);
                    let more = self.b.step(BackupEvent::Claim(Ok(answer)));
                    self.on_b(more);
                }
                other => self.b_log.push(other),
            }
        }
    }

    /// The machine finishes the applies it was handed.
    fn apply_deferred(&mut self) {
        for epoch in std::mem::take(&mut self.deferred) {
            let more = self.b.step(BackupEvent::CheckpointApplied { epoch });
            self.on_b(more);
        }
    }

    fn settle(&mut self) {
        while !self.to_b.is_empty() || !self.to_p.is_empty() {
            let bytes = std::mem::take(&mut self.to_b);
            let actions = self.b.step(BackupEvent::Received { conn: self.conn, bytes: &bytes });
            self.on_b(actions);
            let bytes = std::mem::take(&mut self.to_p);
            let actions = self.p.step(PrimaryEvent::Received(&bytes));
            self.on_p(actions);
        }
    }

    fn connect(&mut self) {
        self.conn += 1;
        self.connected = true;
        let actions = self.b.step(BackupEvent::Connected { conn: self.conn, nonce: B_NONCE });
        self.on_b(actions);
        let actions = self.p.step(PrimaryEvent::Connected { nonce: P_NONCE });
        self.on_p(actions);
        self.settle();
    }

    fn disconnect(&mut self) {
        self.to_b.clear();
        self.to_p.clear();
        self.connected = false;
        let actions = self.p.step(PrimaryEvent::Disconnected);
        self.on_p(actions);
        let actions = self.b.step(BackupEvent::Disconnected { conn: self.conn });
        self.on_b(actions);
    }

    fn checkpoint(&mut self, epoch: u64, payload: &[u8]) {
        let kind = self.p.next_checkpoint_kind();
        let payload = if kind == CheckpointKind::Discard { Vec::new() } else { payload.to_vec() };
        let actions = self.p.step(PrimaryEvent::CheckpointTaken { epoch, icount: epoch * 100, kind, payload });
        self.on_p(actions);
        self.settle();
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let actions = self.p.step(PrimaryEvent::Tick { now_ms });
        self.on_p(actions);
        let actions = self.b.step(BackupEvent::Tick { now_ms });
        self.on_b(actions);
        self.settle();
    }

    fn p_closes(&self) -> Vec<&ProtocolError> {
        self.p_log
            .iter()
            .filter_map(|a| if let PrimaryAction::Close { error } = a { Some(error) } else { None })
            .collect()
    }

    fn b_closes(&self) -> Vec<&ProtocolError> {
        closes(&self.b_log)
    }

    fn releases(&self) -> Vec<u64> {
        self.p_log
            .iter()
            .filter_map(
                |a| if let PrimaryAction::ReleaseOutputs { up_to_epoch } = a { Some(*up_to_epoch) } else { None },
            )
            .collect()
    }
}

/// A hand-driven primary for feeding a backup what a real primary never would.
struct FakePrimary {
    conn: ConnId,
    encoder: Encoder,
}

impl FakePrimary {
    /// Connects `b` as connection `conn` and completes the handshake (Hello, then a first
    /// frame under the session keys) with the given generation.
    fn handshake(b: &mut Backup, conn: ConnId, generation: u64) -> (FakePrimary, Vec<BackupAction>) {
        let (mut fake, mut actions) = FakePrimary::hello(b, conn, generation);
        actions.extend(fake.send(b, Message::Heartbeat { now_ms: 0, epoch: 0 }));
        (fake, actions)
    }

    /// Connects and sends a Hello only: the connection is still pending.
    fn hello(b: &mut Backup, conn: ConnId, generation: u64) -> (FakePrimary, Vec<BackupAction>) {
        b.step(BackupEvent::Connected { conn, nonce: B_NONCE });
        let mut encoder = Encoder::new(psk().hello_key(Direction::PrimaryToBackup));
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            config_digest: DIGEST,
            nonce: P_NONCE,
            run_id: RUN,
            generation,
        };
        let (t, payload) = hello.encode();
        let actions = b.step(BackupEvent::Received { conn, bytes: &encoder.encode(t, &payload).unwrap() });
        encoder.set_key(psk().session_key(Direction::PrimaryToBackup, &P_NONCE, &B_NONCE));
        (FakePrimary { conn, encoder }, actions)
    }

    fn send(&mut self, b: &mut Backup, message: Message) -> Vec<BackupAction> {
        let (t, payload) = message.encode();
        b.step(BackupEvent::Received { conn: self.conn, bytes: &self.encoder.encode(t, &payload).unwrap() })
    }
}

fn sha(payload: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(payload).into()
}

fn closes(actions: &[BackupAction]) -> Vec<&ProtocolError> {
    actions.iter().filter_map(|a| if let BackupAction::Close { error, .. } = a { Some(error) } else { None }).collect()
}

fn sends(actions: Vec<PrimaryAction>) -> Vec<u8> {
    actions.into_iter().flat_map(|a| if let PrimaryAction::Send(b) = a { b } else { vec![] }).collect()
}

#[test]
fn a_full_then_incremental_checkpoints_are_applied_acked_and_release_outputs() {
    let mut w = World::new();
    w.connect();
    assert!(w.p.is_streaming() && w.b.is_streaming());
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
    w.checkpoint(1, b"the whole machine");
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Incremental);
    w.checkpoint(2, b"delta");
    assert_eq!(w.applied, vec![(1, None, b"the whole machine".to_vec()), (2, Some(1), b"delta".to_vec())]);
    assert_eq!(
        w.p_log,
        vec![PrimaryAction::ReleaseOutputs { up_to_epoch: 1 }, PrimaryAction::ReleaseOutputs { up_to_epoch: 2 },]
    );
    assert_eq!(w.b.applied(), Some(CheckpointId { run_id: RUN, epoch: 2 }));
}

#[test]
fn outputs_are_not_released_until_the_machine_reports_the_apply() {
    let mut w = World::new();
    w.connect();
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 1,
        icount: 0,
        kind: CheckpointKind::Full,
        payload: b"x".to_vec(),
    });
    let bytes = sends(actions);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    assert!(matches!(actions.as_slice(), [BackupAction::ApplyCheckpoint { epoch: 1, .. }]));
    assert_eq!(w.p.acked_epoch(), None);
}

#[test]
fn an_empty_checkpoint_is_whole_too() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(5, b"");
    assert_eq!(w.applied, vec![(5, None, vec![])]);
}

#[test]
fn heartbeats_flow_both_ways_and_keep_the_connection() {
    let mut w = World::new();
    w.connect();
    for now in (0..5000).step_by(40) {
        w.tick(now);
    }
    assert!(w.p_closes().is_empty() && w.b_closes().is_empty(), "{:?} {:?}", w.p_log, w.b_log);
    assert!(w.p.is_streaming());
}

#[test]
fn a_configuration_mismatch_names_both_digests_on_both_sides() {
    let b = BackupConfig { config_digest: [0xab; 32], ..backup_config() };
    let mut w = World::with(primary_config(), b);
    w.connect();
    let expected = ProtocolError::ConfigMismatch { ours: [0xab; 32], theirs: DIGEST };
    assert_eq!(w.b_closes(), vec![&expected]);
    let [ProtocolError::PeerClosed { reason }] = w.p_closes()[..] else { panic!("{:?}", w.p_log) };
    assert!(reason.contains(&"ab".repeat(32)) && reason.contains(&"09".repeat(32)), "{reason}");
}

#[test]
fn different_keys_fail_on_the_first_frame_on_both_sides() {
    let b = BackupConfig { key: PresharedKey::new(&[7; 32]).unwrap(), ..backup_config() };
    let mut w = World::with(primary_config(), b);
    w.connect();
    assert_eq!(w.b_closes(), vec![&ProtocolError::Wire(WireError::WrongKey)]);
    assert_eq!(w.p_closes(), vec![&ProtocolError::Wire(WireError::WrongKey)]);
}

#[test]
fn another_protocol_version_is_refused_naming_both() {
    let mut b = Backup::new(backup_config(), 0);
    b.step(BackupEvent::Connected { conn: 1, nonce: B_NONCE });
    let hello = Message::Hello {
        protocol_version: 9,
        role: Role::Primary,
        config_digest: DIGEST,
        nonce: P_NONCE,
        run_id: 1,
        generation: 1,
    };
    let (t, payload) = hello.encode();
    let frame = Encoder::new(psk().hello_key(Direction::PrimaryToBackup)).encode(t, &payload).unwrap();
    let actions = b.step(BackupEvent::Received { conn: 1, bytes: &frame });
    let expected = ProtocolError::ProtocolVersionMismatch { ours: PROTOCOL_VERSION, theirs: 9 };
    assert_eq!(closes(&actions), vec![&expected]);
    assert!(expected.to_string().contains("version 3") && expected.to_string().contains("version 9"));
}

#[test]
fn a_stranger_is_refused_at_its_first_byte() {
    let mut b = Backup::new(backup_config(), 0);
    b.step(BackupEvent::Connected { conn: 1, nonce: B_NONCE });
    let actions = b.step(BackupEvent::Received { conn: 1, bytes: b"GET / HTTP/1.1\r\n" });
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(WireError::BadMagic { .. })]));
}

#[test]
fn a_connection_cut_mid_checkpoint_leaves_the_last_whole_one() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"first");
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 2,
        icount: 0,
        kind: CheckpointKind::Incremental,
        payload: b"second, never whole".to_vec(),
    });
    let bytes = sends(actions);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes[..bytes.len() - 10] });
    assert!(actions.iter().all(|a| !matches!(a, BackupAction::ApplyCheckpoint { .. })));
    let actions = w.b.step(BackupEvent::Disconnected { conn: w.conn });
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(WireError::Truncated { .. })]));
    assert_eq!(w.b.applied(), Some(CheckpointId { run_id: RUN, epoch: 1 }));
}

/// Where each frame of a stream of session frames lies (they carry no nonce of their own).
fn frame_spans(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let length = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().unwrap()) as usize;
        let end = at + crate::wire::HEADER_BYTES + length + crate::wire::TRAILER_BYTES;
        spans.push(at..end);
        at = end;
    }
    spans
}

/// The primary's frames for a full checkpoint of `payload` at epoch 1, on a connected world.
fn full_checkpoint_frames(w: &mut World, payload: &[u8]) -> Vec<u8> {
    let kind = CheckpointKind::Full;
    sends(w.p.step(PrimaryEvent::CheckpointTaken { epoch: 1, icount: 100, kind, payload: payload.to_vec() }))
}

#[test]
fn a_frame_damaged_on_its_way_to_the_backup_is_resent_within_the_connection() {
    let payload = b"0123456789abcdef";
    let spans = frame_spans(&full_checkpoint_frames(&mut World::new_connected(), payload));
    assert_eq!(spans.len(), 6, "Begin, four chunks, End");
    // Each frame in turn, damaged in its payload (or its tag, or its CRC32C): the backup asks
    // for it again, and ends up with what an undamaged link would have given it.
    for (index, span) in spans.iter().enumerate() {
        for at in [span.start + crate::wire::HEADER_BYTES, span.end - 1] {
            let mut w = World::new_connected();
            let mut bytes = full_checkpoint_frames(&mut w, payload);
            bytes[at] ^= 0x08;
            let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
            assert!(closes(&actions).is_empty(), "frame {index}, byte {at}: {actions:?}");
            w.on_b(actions);
            w.settle();
            assert_eq!(w.applied, vec![(1, None, payload.to_vec())], "frame {index}, byte {at}");
            assert_eq!(w.p.acked_epoch(), Some(1));
            assert!(w.p_closes().is_empty() && w.b_closes().is_empty(), "{:?} {:?}", w.p_log, w.b_log);
            assert_eq!(w.b.primary_conn(), Some(w.conn), "the same connection");
            assert_eq!((w.b.status().damaged_frames, w.p.status().resends_served), (1, 1));
        }
    }
}

#[test]
fn an_ack_damaged_on_its_way_to_the_primary_is_resent_and_releases_outputs() {
    let mut w = World::new_connected();
    let bytes = full_checkpoint_frames(&mut w, b"state");
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    let [BackupAction::ApplyCheckpoint { epoch: 1, .. }] = actions.as_slice() else { panic!("{actions:?}") };
    let actions = w.b.step(BackupEvent::CheckpointApplied { epoch: 1 });
    let [BackupAction::Send { bytes: ack, .. }] = actions.as_slice() else { panic!("{actions:?}") };
    let mut ack = ack.clone();
    ack[crate::wire::HEADER_BYTES] ^= 0x01;
    let actions = w.p.step(PrimaryEvent::Received(&ack));
    assert!(actions.iter().all(|a| matches!(a, PrimaryAction::Send(_))), "only a resend request: {actions:?}");
    assert_eq!(w.p.acked_epoch(), None);
    w.on_p(actions);
    w.settle();
    assert_eq!(w.p.acked_epoch(), Some(1));
    assert_eq!(w.releases(), vec![1]);
    assert!(w.p_closes().is_empty() && w.b_closes().is_empty(), "{:?} {:?}", w.p_log, w.b_log);
    assert_eq!((w.p.status().damaged_frames, w.b.status().resends_served), (1, 1));
}

/// Both ways damaged at once: each side waits for the other's resend, and each request to
/// resend arrives while its reader skips what comes after its own damaged frame. With
/// `lose_requests`, both requests arrive damaged too, and only asking again (at a tick) gets
/// the frames through.
fn damage_both_ways(lose_requests: bool) -> World {
    let mut w = World::new_connected();
    w.checkpoint(1, b"full");
    let kind = CheckpointKind::Incremental;
    let payload = b"0123456789abcdef".to_vec();
    let mut to_b = sends(w.p.step(PrimaryEvent::CheckpointTaken { epoch: 2, icount: 200, kind, payload }));
    let chunk = frame_spans(&to_b)[2].clone();
    to_b[chunk.start + crate::wire::HEADER_BYTES] ^= 0x01;
    let actions = w.b.step(BackupEvent::Tick { now_ms: 10 });
    let [BackupAction::Send { bytes: heartbeat, .. }] = actions.as_slice() else { panic!("{actions:?}") };
    let mut to_p = heartbeat.clone();
    to_p[crate::wire::HEADER_BYTES] ^= 0x01;
    let b_asks = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &to_b });
    let p_asks = w.p.step(PrimaryEvent::Received(&to_p));
    assert!(closes(&b_asks).is_empty() && w.b.status().damaged_frames == 1, "{b_asks:?}");
    assert!(p_asks.iter().all(|a| matches!(a, PrimaryAction::Send(_))) && w.p.status().damaged_frames == 1);
    w.on_p(p_asks);
    w.on_b(b_asks);
    if lose_requests {
        w.to_p[crate::wire::HEADER_BYTES] ^= 0x01;
        w.to_b[crate::wire::HEADER_BYTES] ^= 0x01;
    }
    w.settle();
    w
}

#[test]
fn frames_damaged_both_ways_at_once_are_both_resent() {
    let w = damage_both_ways(false);
    assert_eq!(w.applied.last(), Some(&(2, Some(1), b"0123456789abcdef".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(2));
    assert!(w.p_closes().is_empty() && w.b_closes().is_empty(), "{:?} {:?}", w.p_log, w.b_log);
}

#[test]
fn requests_to_resend_that_arrive_damaged_are_made_again() {
    let mut w = damage_both_ways(true);
    assert_eq!(w.applied.len(), 1, "the backup still waits for the damaged chunk");
    w.tick(40);
    assert_eq!(w.applied.last(), Some(&(2, Some(1), b"0123456789abcdef".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(2));
    assert!(w.p_closes().is_empty() && w.b_closes().is_empty(), "{:?} {:?}", w.p_log, w.b_log);
}

#[test]
fn a_forged_frame_changes_nothing_and_the_genuine_one_is_asked_for_again() {
    let mut w = World::new_connected();
    let mut bytes = full_checkpoint_frames(&mut w, b"0123456789abcdef");
    let chunk = frame_spans(&bytes)[1].clone();
    // A forger who fixes both checksums: only the tag catches the change.
    bytes[chunk.start + crate::wire::HEADER_BYTES + 16] ^= 0x01;
    let crc_at = chunk.end - 4;
    let crc = crc32c::crc32c(&bytes[chunk.start..crc_at]);
    bytes[crc_at..chunk.end].copy_from_slice(&crc.to_le_bytes());
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    assert!(actions.iter().all(|a| matches!(a, BackupAction::Send { .. })), "{actions:?}");
    assert_eq!(w.b.status().partial_bytes, 0, "nothing of the forged chunk, nor of those after it, was taken");
    w.on_b(actions);
    w.settle();
    assert_eq!(w.applied, vec![(1, None, b"0123456789abcdef".to_vec())]);
}

#[test]
fn a_damaged_header_closes_the_connection_without_applying() {
    let mut w = World::new_connected();
    let mut bytes = full_checkpoint_frames(&mut w, b"abcdefgh");
    let chunk = frame_spans(&bytes)[1].clone();
    bytes[chunk.start + 17] ^= 0x01; // its length: the framing is lost
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    assert!(actions.iter().all(|a| !matches!(a, BackupAction::ApplyCheckpoint { .. })));
    assert_eq!(closes(&actions), vec![&ProtocolError::Wire(WireError::BadHeaderChecksum { seq: 3 })]);
    assert_eq!(w.b.applied(), None);
}

#[test]
fn a_frame_replayed_on_its_own_connection_is_refused_and_changes_nothing() {
    let mut w = World::new_connected();
    w.checkpoint(1, b"full");
    let kind = CheckpointKind::Incremental;
    let delta = b"delta".to_vec();
    let bytes = sends(w.p.step(PrimaryEvent::CheckpointTaken { epoch: 2, icount: 200, kind, payload: delta }));
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    w.on_b(actions);
    assert_eq!(w.applied.len(), 2);
    // The whole checkpoint again, as recorded: its sequence numbers are spent.
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(WireError::OutOfOrder { .. })]), "{actions:?}");
    w.on_b(actions);
    assert_eq!(w.applied.len(), 2, "applied once");
    assert_eq!(w.b.applied(), Some(CheckpointId { run_id: RUN, epoch: 2 }));
}

#[test]
fn a_request_to_resend_what_is_not_kept_or_was_never_sent_closes_the_connection() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    let actions = fake.send(&mut b, Message::Resend { from_seq: 0 }); // the HelloAck: never kept
    let unavailable = WireError::ResendUnavailable { seq: 0, oldest: None };
    assert_eq!(closes(&actions), vec![&ProtocolError::Wire(unavailable)]);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 2, 1);
    let actions = fake.send(&mut b, Message::Resend { from_seq: 9 });
    assert_eq!(closes(&actions), vec![&ProtocolError::Wire(WireError::ResendOfUnsentFrame { seq: 9, sent: Some(0) })]);
}

#[test]
fn a_reconnect_continues_incrementally_when_the_backup_holds_the_last_epoch() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Incremental);
    w.checkpoint(2, b"delta");
    assert_eq!(w.applied.last(), Some(&(2, Some(1), b"delta".to_vec())));
}

#[test]
fn epochs_taken_while_disconnected_are_resent_on_reconnect() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.checkpoint(2, b"kept delta");
    w.checkpoint(3, b"another");
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Incremental);
    w.checkpoint(4, b"live");
    let epochs: Vec<_> = w.applied.iter().map(|(e, base, _)| (*e, *base)).collect();
    assert_eq!(epochs, vec![(1, None), (2, Some(1)), (3, Some(2)), (4, Some(3))]);
    assert_eq!(w.p.acked_epoch(), Some(4));
}

#[test]
fn a_log_past_its_limit_is_dropped_and_a_full_checkpoint_follows() {
    let p = PrimaryConfig { max_log_bytes: 10, ..primary_config() };
    let mut w = World::with(p, backup_config());
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.checkpoint(2, b"0123456789abc");
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Discard);
    w.checkpoint(3, b"");
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
    w.checkpoint(4, b"full again");
    assert_eq!(w.applied.last(), Some(&(4, None, b"full again".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(4));
}

#[test]
fn an_incremental_taken_against_advice_is_dropped_not_sent() {
    let mut w = World::new();
    w.connect();
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 1,
        icount: 0,
        kind: CheckpointKind::Incremental,
        payload: b"d".to_vec(),
    });
    assert!(actions.is_empty());
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
}

#[test]
fn a_backup_refuses_an_incremental_that_misses_its_base_and_asks_for_a_full() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    let actions =
        fake.send(&mut b, Message::CheckpointBegin { epoch: 4, base_epoch: Some(3), icount: 0, total_bytes: 1 });
    assert_eq!(actions.len(), 1, "{actions:?}");
    fake.send(&mut b, Message::CheckpointChunk { epoch: 4, offset: 0, bytes: vec![1] });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 4, digest: sha(&[1]) });
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(b.applied(), None);
    // The primary, on NeedFull, switches to a full checkpoint.
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.checkpoint(2, b"delta");
    let need_full = Message::NeedFull { epoch: 2, latest: None };
    let (t, payload) = need_full.encode();
    let mut encoder = Encoder::new(psk().session_key(Direction::BackupToPrimary, &P_NONCE, &B_NONCE));
    for _ in 0..3 {
        encoder.encode(0, &[]).unwrap(); // the HelloAck and two Acks took sequence numbers 0 to 2
    }
    let actions = w.p.step(PrimaryEvent::Received(&encoder.encode(t, &payload).unwrap()));
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
}

#[test]
fn a_checkpoint_over_the_limit_is_refused_before_any_byte_is_buffered() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    let actions =
        fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 1 << 40 });
    let expected = ProtocolError::CheckpointTooLarge { epoch: 1, total_bytes: 1 << 40, limit: 1024 };
    assert_eq!(closes(&actions), vec![&expected]);
}

#[test]
fn a_digest_mismatch_is_never_applied() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 2 });
    fake.send(&mut b, Message::CheckpointChunk { epoch: 1, offset: 0, bytes: vec![1, 2] });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 1, digest: sha(&[2, 1]) });
    assert_eq!(closes(&actions), vec![&ProtocolError::CheckpointDigestMismatch { epoch: 1 }]);
    assert!(actions.iter().all(|a| !matches!(a, BackupAction::ApplyCheckpoint { .. })));
}

#[test]
fn chunks_out_of_place_or_too_long_are_malformed() {
    for chunk in [
        Message::CheckpointChunk { epoch: 1, offset: 1, bytes: vec![1] },
        Message::CheckpointChunk { epoch: 1, offset: 0, bytes: vec![1, 2, 3] },
        Message::CheckpointChunk { epoch: 2, offset: 0, bytes: vec![1] },
    ] {
        let mut b = Backup::new(backup_config(), 0);
        let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
        fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 2 });
        let actions = fake.send(&mut b, chunk);
        assert!(matches!(closes(&actions)[..], [ProtocolError::MalformedCheckpoint { epoch: 1, .. }]), "{actions:?}");
    }
}

#[test]
fn a_short_checkpoint_is_malformed_at_its_end() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 2 });
    fake.send(&mut b, Message::CheckpointChunk { epoch: 1, offset: 0, bytes: vec![1] });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 1, digest: sha(&[1]) });
    assert!(matches!(closes(&actions)[..], [ProtocolError::MalformedCheckpoint { epoch: 1, .. }]));
}

#[test]
fn epochs_must_increase_within_a_run() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 5, base_epoch: None, icount: 0, total_bytes: 0 });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 5, digest: sha(&[]) });
    b.step(BackupEvent::CheckpointApplied { epoch: 5 });
    assert_eq!(actions.len(), 1);
    let actions = fake.send(&mut b, Message::CheckpointBegin { epoch: 5, base_epoch: None, icount: 0, total_bytes: 0 });
    assert_eq!(closes(&actions), vec![&ProtocolError::EpochNotIncreasing { latest: 5, got: 5 }]);
}

#[test]
fn a_primary_of_an_older_generation_is_refused() {
    let mut b = Backup::new(backup_config(), 0);
    FakePrimary::handshake(&mut b, 1, 5);
    let (_, actions) = FakePrimary::hello(&mut b, 2, 4);
    assert_eq!(closes(&actions), vec![&ProtocolError::StaleGeneration { seen: 5, theirs: 4 }]);
}

#[test]
fn a_replayed_session_frame_fails_on_another_connection() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    let (t, payload) = Message::Heartbeat { now_ms: 1, epoch: 0 }.encode();
    let recorded = fake.encoder.encode(t, &payload).unwrap();
    b.step(BackupEvent::Received { conn: 1, bytes: &recorded });
    // A new connection: same primary nonce, but the backup picks a fresh one.
    b.step(BackupEvent::Connected { conn: 2, nonce: [3; 16] });
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Primary,
        config_digest: DIGEST,
        nonce: P_NONCE,
        run_id: RUN,
        generation: 1,
    };
    let (t, payload) = hello.encode();
    b.step(BackupEvent::Received {
        conn: 2,
        bytes: &Encoder::new(psk().hello_key(Direction::PrimaryToBackup)).encode(t, &payload).unwrap(),
    });
    let actions = b.step(BackupEvent::Received { conn: 2, bytes: &recorded });
    assert_eq!(closes(&actions), vec![&ProtocolError::Wire(WireError::BadAuthentication { seq: 2 })]);
    // The stranger never touched the primary's connection.
    assert!(b.is_streaming());
}

#[test]
fn a_silent_backup_is_dropped_and_a_stalled_handshake_times_out() {
    let mut w = World::new();
    w.connect();
    w.p.step(PrimaryEvent::Tick { now_ms: 0 }); // the handshake's frames count as heard at 0
    w.p.step(PrimaryEvent::Tick { now_ms: 499 });
    let actions = w.p.step(PrimaryEvent::Tick { now_ms: 500 });
    assert!(actions
        .iter()
        .any(|a| matches!(a, PrimaryAction::Close { error: ProtocolError::PeerSilent { silent_ms: 500 } })));
    let mut p = Primary::new(primary_config(), 1, 0);
    p.step(PrimaryEvent::Connected { nonce: P_NONCE });
    let actions = p.step(PrimaryEvent::Tick { now_ms: 2000 });
    assert!(actions
        .iter()
        .any(|a| matches!(a, PrimaryAction::Close { error: ProtocolError::HandshakeTimeout { .. } })));
}

#[test]
fn an_ack_of_an_epoch_never_sent_closes_the_connection() {
    let mut w = World::new();
    w.connect();
    let (t, payload) = Message::Ack { epoch: 9 }.encode();
    let mut encoder = Encoder::new(psk().session_key(Direction::BackupToPrimary, &P_NONCE, &B_NONCE));
    encoder.encode(0, &[]).unwrap(); // the HelloAck's sequence number
    let actions = w.p.step(PrimaryEvent::Received(&encoder.encode(t, &payload).unwrap()));
    assert!(actions.contains(&PrimaryAction::Close { error: ProtocolError::AckOfUnsentEpoch { epoch: 9, sent: None } }));
}

// ---------------------------------------------------------------------------------------------
// Ownership: a backup never goes live with a state older than an output that left.

/// A backup slower to suspect than the primary is to give up on it (as in the end-to-end
/// tests), so that a cut link makes the primary go unprotected first.
fn patient_backup() -> BackupConfig {
    BackupConfig { failover_timeout_ms: 1000, ..backup_config() }
}

fn protected_world() -> World {
    let mut w = World::with(primary_config(), patient_backup());
    w.connect();
    w.checkpoint(1, b"full");
    w.checkpoint(2, b"delta");
    assert_eq!(w.p.protection(), Protection::Protected);
    assert_eq!(w.b.state_generation(), Some(1));
    w
}

#[test]
fn a_primary_that_loses_its_backup_swaps_the_generation_before_releasing_anything() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"unacked");
    w.tick(199);
    assert_eq!(w.releases(), vec![1, 2], "nothing released within the grace period");
    w.tick(200);
    let swap = w.p_log.iter().position(|a| *a == PrimaryAction::SwapGeneration { expected: 1, ended: None });
    let release = w.p_log.iter().position(|a| *a == PrimaryAction::ReleaseOutputs { up_to_epoch: 3 });
    assert!(swap.is_some() && swap < release, "{:?}", w.p_log);
    assert_eq!(w.record.generation, 2);
    assert_eq!(w.p.protection(), Protection::Unprotected);
    assert!(w.p_log.contains(&PrimaryAction::ProtectionChanged { protected: false, generation: 2 }));
    // Outputs now leave as each checkpoint is taken.
    w.checkpoint(4, b"more");
    assert_eq!(w.releases(), vec![1, 2, 3, 4]);
}

#[test]
fn a_cut_off_backup_cannot_take_over_with_a_state_older_than_released_outputs() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"released unprotected");
    w.tick(200);
    assert_eq!(w.releases(), vec![1, 2, 3]);
    // The primary dies; the backup hears the new generation from the store.
    w.tick(2000);
    assert!(w.b_log.contains(&BackupAction::ClaimOwnership { generation: 1 }), "{:?}", w.b_log);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })), "{:?}", w.b_log);
    assert!(w.b_log.iter().any(|a| matches!(a, BackupAction::CannotTakeOver { .. })));
    assert!(w.b.status().stale);
    assert_eq!(w.record, Record { generation: 2, owner: "primary", ended: None });
}

#[test]
fn a_backup_that_heard_of_a_newer_generation_does_not_even_try() {
    let mut w = protected_world();
    w.disconnect();
    w.tick(200); // unprotected at generation 2
    w.conn += 1;
    w.connected = true;
    // The primary reconnects: its Hello says generation 2, then it dies mid-resync.
    let actions = w.b.step(BackupEvent::Connected { conn: w.conn, nonce: B_NONCE });
    w.on_b(actions);
    let actions = w.p.step(PrimaryEvent::Connected { nonce: P_NONCE });
    w.on_p(actions);
    let hello = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &hello });
    w.on_b(actions);
    let answer = std::mem::take(&mut w.to_p);
    let actions = w.p.step(PrimaryEvent::Received(&answer));
    w.on_p(actions);
    let first = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &first });
    w.on_b(actions);
    assert!(w.b.status().stale);
    w.disconnect();
    let actions = w.b.step(BackupEvent::Tick { now_ms: 10_000 });
    assert!(matches!(actions[..], [BackupAction::ReadOwnership, BackupAction::CannotTakeOver { .. }]), "{actions:?}");
}

#[test]
fn a_resynchronized_backup_is_declared_protected_under_the_new_generation_and_can_take_over() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"released unprotected");
    w.tick(200);
    w.checkpoint(4, b"also");
    w.connect();
    // The kept epochs 3 and 4 were resent; the backup caught up.
    assert_eq!(w.b.applied(), Some(CheckpointId { run_id: RUN, epoch: 4 }));
    assert!(matches!(w.p.protection(), Protection::Protected), "{:?}", w.p.protection());
    assert!(w.p_log.contains(&PrimaryAction::ProtectionChanged { protected: true, generation: 2 }));
    assert_eq!(w.b.state_generation(), Some(2));
    assert!(!w.b.status().stale);
    w.checkpoint(5, b"protected again");
    assert_eq!(w.releases(), vec![1, 2, 3, 4, 5]);
    // Now the primary dies: the backup takes over from epoch 5, which covers every release.
    w.disconnect();
    let actions = w.b.step(BackupEvent::Tick { now_ms: 10_000 });
    w.on_b(actions);
    assert!(w.b_log.contains(&BackupAction::GoLive { epoch: 5, icount: 500, generation: 3 }), "{:?}", w.b_log);
}

#[test]
fn a_restarted_primary_that_took_up_its_generation_fences_the_earlier_runs_backup_before_releasing() {
    // A --resilient primary's monitor dies and a new one (a new run) takes up generation 1,
    // which the backup's state from the old run counts for. Cut off from the backup past the
    // grace period, the new run must swap the generation before releasing anything: the
    // backup would otherwise take over with a state older than the released outputs.
    let mut w = protected_world();
    w.disconnect();
    let restarted = PrimaryConfig { earlier_run_protected: true, ..PrimaryConfig::new(psk(), DIGEST, RUN + 1) };
    w.p = Primary::new(restarted, 1, w.now_ms);
    w.p_log.clear();
    w.checkpoint(1, b"unacked");
    w.tick(w.now_ms + 300);
    let swap = w.p_log.iter().position(|a| *a == PrimaryAction::SwapGeneration { expected: 1, ended: None });
    let release = w.p_log.iter().position(|a| *a == PrimaryAction::ReleaseOutputs { up_to_epoch: 1 });
    assert!(swap.is_some() && swap < release, "{:?}", w.p_log);
    assert_eq!(w.record.generation, 2);
    // The old run's state no longer counts: the backup cannot take over with it.
    w.tick(w.now_ms + 2000);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })), "{:?}", w.b_log);
    // Without the flag (a fresh primary), nothing could have held this generation's state.
    let mut fresh = World::with(primary_config(), patient_backup());
    fresh.checkpoint(1, b"unacked");
    fresh.tick(300);
    assert!(!fresh.p_log.iter().any(|a| matches!(a, PrimaryAction::SwapGeneration { .. })), "{:?}", fresh.p_log);
}

#[test]
fn with_hold_the_primary_never_runs_unprotected() {
    let p = PrimaryConfig { on_backup_loss: BackupLossPolicy::Hold, ..primary_config() };
    let b = BackupConfig { failover_timeout_ms: 100_000, ..backup_config() };
    let mut w = World::with(p, b);
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.checkpoint(2, b"held");
    w.tick(60_000);
    assert_eq!(w.releases(), vec![1]);
    assert_eq!(w.p.protection(), Protection::Protected);
    assert_eq!(w.record.generation, 1);
    w.connect();
    assert_eq!(w.releases(), vec![1, 2]);
}

#[test]
fn a_full_checkpoint_cut_off_midway_resumes_where_it_stopped() {
    let mut w = World::new();
    w.connect();
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 1,
        icount: 100,
        kind: CheckpointKind::Full,
        payload: b"0123456789abcdefghij".to_vec(),
    });
    let bytes = sends(actions);
    // Half the frames arrive, then the link breaks (a damaged frame, say).
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes[..bytes.len() / 2] });
    w.on_b(actions);
    let held = w.b.status().partial_bytes;
    assert!(held > 0 && held < 20, "{held}");
    w.disconnect();
    let sent_before = w.p_log.len();
    w.connect();
    assert_eq!(w.applied, vec![(1, None, b"0123456789abcdefghij".to_vec())], "{:?} {:?}", w.p_log, w.b_log);
    assert_eq!(w.p.status().resumed_checkpoints, 1);
    let _ = sent_before;
}

#[test]
fn strangers_never_disturb_the_primary_connection_nor_its_silence_measure() {
    let mut w = protected_world();
    let primary_conn = w.conn;
    // A flood of idle and garbage connections, far more than the pending cap.
    for stranger in 100..200 {
        let actions = w.b.step(BackupEvent::Connected { conn: stranger, nonce: [5; 16] });
        w.on_b(actions);
        if stranger % 2 == 0 {
            let actions = w.b.step(BackupEvent::Received { conn: stranger, bytes: b"\x00garbage" });
            w.on_b(actions);
        }
    }
    assert!(w.b.status().pending_handshakes <= backup_config().max_pending_handshakes);
    assert!(w.b.is_streaming());
    assert_eq!(w.conn, primary_conn);
    w.checkpoint(3, b"still flowing");
    assert_eq!(w.p.acked_epoch(), Some(3));
    // Idle strangers are dropped at their deadline; the backup stays quiet while the
    // primary's heartbeats flow.
    for now in (10..1000).step_by(10) {
        w.tick(now);
    }
    assert_eq!(w.b.status().pending_handshakes, 0);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::ClaimOwnership { .. })));
    assert!(w.b.is_streaming());
}

#[test]
fn a_replayed_hello_cannot_displace_the_primary() {
    let mut w = protected_world();
    // Record the primary's Hello, then replay it on a new connection.
    let mut encoder = Encoder::new(psk().hello_key(Direction::PrimaryToBackup));
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Primary,
        config_digest: DIGEST,
        nonce: P_NONCE,
        run_id: RUN,
        generation: 1,
    };
    let (t, payload) = hello.encode();
    let replay = encoder.encode(t, &payload).unwrap();
    let actions = w.b.step(BackupEvent::Connected { conn: 50, nonce: [6; 16] });
    w.on_b(actions);
    let actions = w.b.step(BackupEvent::Received { conn: 50, bytes: &replay });
    w.on_b(actions);
    // It can go no further without the session keys; the primary's link is untouched.
    assert!(w.b.is_streaming());
    w.checkpoint(3, b"unaffected");
    assert_eq!(w.p.acked_epoch(), Some(3));
}

#[test]
fn a_vm_that_ends_ends_on_both_sides() {
    let mut w = protected_world();
    w.checkpoint(3, b"final");
    let actions = w.p.step(PrimaryEvent::VmEnded { epoch: 3, exit_code: 3 });
    w.on_p(actions);
    w.settle();
    assert!(w.p_log.contains(&PrimaryAction::Finished { exit_code: 3, released: true }), "{:?}", w.p_log);
    assert_eq!(w.releases(), vec![1, 2, 3]);
    assert!(w.b_log.contains(&BackupAction::Exit { exit_code: 3 }), "{:?}", w.b_log);
    assert_eq!(w.record.ended, Some(3));
    // The backup never takes over, however long it waits.
    w.disconnect();
    w.tick(100_000);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })));
}

#[test]
fn a_vm_that_ends_with_its_backup_unreachable_marks_the_record_before_releasing() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"final");
    let actions = w.p.step(PrimaryEvent::VmEnded { epoch: 3, exit_code: 7 });
    w.on_p(actions);
    let mark = w.p_log.iter().position(|a| *a == PrimaryAction::SwapGeneration { expected: 1, ended: Some(7) });
    let release = w.p_log.iter().position(|a| *a == PrimaryAction::ReleaseOutputs { up_to_epoch: 3 });
    assert!(mark.is_some() && mark < release, "{:?}", w.p_log);
    assert!(w.p_log.contains(&PrimaryAction::Finished { exit_code: 7, released: true }));
    // The backup, hearing nothing, finds the VM ended and exits with its code.
    w.tick(10_000);
    assert!(w.b_log.contains(&BackupAction::Exit { exit_code: 7 }), "{:?}", w.b_log);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })));
}

#[test]
fn an_ending_primary_that_lost_ownership_releases_nothing() {
    let mut w = protected_world();
    w.disconnect();
    w.record = Record { generation: 2, owner: "backup", ended: None }; // the backup took over
    w.checkpoint(3, b"final");
    let actions = w.p.step(PrimaryEvent::VmEnded { epoch: 3, exit_code: 0 });
    w.on_p(actions);
    assert!(w.p_log.contains(&PrimaryAction::Finished { exit_code: 0, released: false }), "{:?}", w.p_log);
    assert_eq!(w.releases(), vec![1, 2]);
    assert!(w.p_log.iter().any(|a| matches!(a, PrimaryAction::Stop { error: ProtocolError::OwnershipLost { .. } })));
}

#[test]
fn a_spurious_takeover_fences_the_primary_before_it_releases_unacknowledged_outputs() {
    let mut w = protected_world();
    w.checkpoint(3, b"acked");
    // The backup stops hearing the primary (a stall), takes over; the primary runs on.
    w.disconnect();
    let actions = w.b.step(BackupEvent::Tick { now_ms: 1000 });
    w.on_b(actions);
    assert!(w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { epoch: 3, .. })), "{:?}", w.b_log);
    w.checkpoint(4, b"never acked");
    w.tick(1300);
    assert_eq!(w.releases(), vec![1, 2, 3]);
    assert!(w.p_log.iter().any(|a| matches!(a, PrimaryAction::Stop { error: ProtocolError::OwnershipLost { .. } })));
}

#[test]
fn a_primary_holding_outputs_notices_it_was_fenced() {
    let p = PrimaryConfig { on_backup_loss: BackupLossPolicy::Hold, ..primary_config() };
    let mut w = World::with(p, backup_config());
    w.record = Record { generation: 5, owner: "someone else", ended: None };
    w.tick(600);
    assert!(w.p_log.iter().any(|a| matches!(a, PrimaryAction::Stop { .. })), "{:?}", w.p_log);
}

#[test]
fn a_first_session_frame_the_backup_refuses_closes_that_connection_without_a_panic() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::hello(&mut b, 1, 1);
    // An Ack is no message for a backup: the connection, just promoted, is closed.
    let actions = fake.send(&mut b, Message::Ack { epoch: 1 });
    assert!(matches!(closes(&actions)[..], [ProtocolError::UnexpectedMessage { message: "Ack", .. }]), "{actions:?}");
    assert!(!b.is_streaming());
    assert_eq!(b.status().pending_handshakes, 0);
}

#[test]
fn a_stranger_failing_its_handshake_does_not_spoil_the_resume_of_a_cut_off_checkpoint() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut first, _) = FakePrimary::handshake(&mut b, 1, 1);
    first.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 4 });
    first.send(&mut b, Message::CheckpointChunk { epoch: 1, offset: 0, bytes: vec![1, 2] });
    b.step(BackupEvent::Disconnected { conn: 1 });
    let (mut second, _) = FakePrimary::handshake(&mut b, 2, 1);
    // A stranger connects and sends garbage while the primary is about to resume.
    b.step(BackupEvent::Connected { conn: 3, nonce: [5; 16] });
    let actions = b.step(BackupEvent::Received { conn: 3, bytes: b"\x00garbage" });
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(WireError::BadMagic { .. })]));
    let actions = second.send(&mut b, Message::CheckpointResume { epoch: 1, offset: 2 });
    assert!(closes(&actions).is_empty(), "{actions:?}");
    second.send(&mut b, Message::CheckpointChunk { epoch: 1, offset: 2, bytes: vec![3, 4] });
    let actions = second.send(&mut b, Message::CheckpointEnd { epoch: 1, digest: sha(&[1, 2, 3, 4]) });
    assert!(matches!(actions[..], [BackupAction::ApplyCheckpoint { epoch: 1, .. }]), "{actions:?}");
}

#[test]
fn a_stranger_failing_its_handshake_does_not_spoil_the_skipping_of_an_unfitting_checkpoint() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 4, base_epoch: Some(3), icount: 0, total_bytes: 1 });
    b.step(BackupEvent::Connected { conn: 2, nonce: [5; 16] });
    b.step(BackupEvent::Received { conn: 2, bytes: b"\x00garbage" });
    let actions = fake.send(&mut b, Message::CheckpointChunk { epoch: 4, offset: 0, bytes: vec![1] });
    assert!(closes(&actions).is_empty(), "{actions:?}");
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 4, digest: sha(&[1]) });
    assert!(closes(&actions).is_empty(), "{actions:?}");
    assert!(b.is_streaming());
}

#[test]
fn an_older_handshake_of_the_same_primary_is_dropped_when_a_newer_one_completes() {
    let mut b = Backup::new(backup_config(), 0);
    // The primary's first attempt stalls after its Hello; it gives up and connects again.
    let (mut stale, _) = FakePrimary::hello(&mut b, 1, 1);
    let (_, actions) = FakePrimary::handshake(&mut b, 2, 1);
    assert_eq!(
        actions.iter().find(|a| matches!(a, BackupAction::Close { conn: 1, .. })),
        Some(&BackupAction::Close { conn: 1, error: ProtocolError::ConnectionReplaced })
    );
    // Frames of the abandoned attempt that arrive late cannot displace the newer link.
    let actions = stale.send(&mut b, Message::Heartbeat { now_ms: 0, epoch: 0 });
    assert!(closes(&actions).is_empty(), "{actions:?}");
    assert!(b.is_streaming());
}

#[test]
fn checkpoints_that_arrive_during_a_refused_claim_are_applied_once_it_is_refused() {
    let mut w = protected_world();
    w.disconnect();
    w.tick(200); // the primary swaps to generation 2 and runs unprotected
    w.checkpoint(3, b"kept for the backup");
    // The backup suspects; its claim is still under way when the primary reconnects.
    let actions = w.b.step(BackupEvent::Tick { now_ms: 1500 });
    assert!(actions.contains(&BackupAction::ClaimOwnership { generation: 1 }), "{actions:?}");
    w.connect();
    assert_eq!(w.applied.len(), 2, "nothing is applied while the claim is under way");
    let answer = w.record.swap(1, "backup", None);
    let actions = w.b.step(BackupEvent::Claim(Ok(answer)));
    assert!(actions.iter().any(|a| matches!(a, BackupAction::ApplyCheckpoint { epoch: 3, .. })), "{actions:?}");
}

#[test]
fn a_stale_backup_learns_from_the_record_that_the_vm_ended_and_exits() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"released unprotected");
    w.tick(200); // unprotected: the backup's state is stale now
    w.checkpoint(4, b"final");
    let actions = w.p.step(PrimaryEvent::VmEnded { epoch: 4, exit_code: 5 });
    w.on_p(actions);
    assert_eq!(w.record.ended, Some(5));
    assert!(!w.b_log.contains(&BackupAction::Exit { exit_code: 5 }));
    // The primary is gone; the stale backup cannot take over, but it reads the record.
    let actions = w.b.step(BackupEvent::Tick { now_ms: 5000 });
    w.on_b(actions);
    assert!(w.b_log.contains(&BackupAction::Exit { exit_code: 5 }), "{:?}", w.b_log);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })));
}

fn position(log: &[PrimaryAction], wanted: &PrimaryAction) -> Option<usize> {
    log.iter().position(|a| a == wanted)
}

#[test]
fn unprotect_swaps_the_generation_before_releasing_and_the_backup_stands_down() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"not acknowledged");
    w.connect(); // the kept epoch 3 is resent and acknowledged
    w.checkpoint(4, b"in flight");
    let actions = w.p.step(PrimaryEvent::Unprotect);
    w.on_p(actions);
    w.settle();
    let swap = position(&w.p_log, &PrimaryAction::SwapGeneration { expected: 1, ended: None });
    let detached = position(&w.p_log, &PrimaryAction::Detached { generation: 2 });
    assert!(swap.is_some() && swap < detached, "{:?}", w.p_log);
    assert_eq!(w.releases().last(), Some(&4), "everything taken is released");
    assert_eq!(w.record, Record { generation: 2, owner: "primary", ended: None });
    assert!(w.b_log.contains(&BackupAction::StandDown), "{:?}", w.b_log);
    assert!(w.b_closes().contains(&&ProtocolError::StoodDown), "{:?}", w.b_log);
    // The backup is done: no tick, however late, makes it claim or go live.
    w.tick(60_000);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::ClaimOwnership { .. } | BackupAction::GoLive { .. })));
    // And the primary does nothing more.
    let after =
        w.p.step(PrimaryEvent::CheckpointTaken { epoch: 5, icount: 500, kind: CheckpointKind::Full, payload: vec![1] });
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(w.p.stopped(), Some(&ProtocolError::Detached));
}

#[test]
fn an_unprotected_backup_that_was_never_told_cannot_take_over() {
    // The link is cut as the primary unprotects: StandDown never arrives, and outputs the
    // backup never acknowledged leave. The swap came first, so its claim fails.
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"never reached the backup");
    let actions = w.p.step(PrimaryEvent::Unprotect);
    w.on_p(actions);
    let swap = position(&w.p_log, &PrimaryAction::SwapGeneration { expected: 1, ended: None });
    let release = position(&w.p_log, &PrimaryAction::ReleaseOutputs { up_to_epoch: 3 });
    assert!(swap.is_some() && swap < release, "{:?}", w.p_log);
    assert!(w.p_log.contains(&PrimaryAction::Detached { generation: 2 }));
    w.tick(10_000);
    assert!(w.b_log.contains(&BackupAction::ClaimOwnership { generation: 1 }), "{:?}", w.b_log);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })), "{:?}", w.b_log);
    assert!(w.b.status().stale);
    assert_eq!(w.record, Record { generation: 2, owner: "primary", ended: None });
}

#[test]
fn unprotecting_a_primary_that_was_never_protected_needs_no_swap() {
    // Still catching up (no backup was told its state counts for this generation).
    let mut w = World::new();
    w.checkpoint(1, b"");
    let actions = w.p.step(PrimaryEvent::Unprotect);
    w.on_p(actions);
    assert!(!w.p_log.iter().any(|a| matches!(a, PrimaryAction::SwapGeneration { .. })), "{:?}", w.p_log);
    assert_eq!(w.releases(), vec![1]);
    assert!(w.p_log.contains(&PrimaryAction::Detached { generation: 1 }));
    assert_eq!(w.record.generation, 1);
}

#[test]
fn unprotect_with_the_store_unreachable_releases_nothing_until_a_retry_swaps() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"held");
    let swap = PrimaryAction::SwapGeneration { expected: 1, ended: None };
    assert_eq!(w.p.step(PrimaryEvent::Unprotect), vec![swap.clone()]);
    let refused = w.p.step(PrimaryEvent::Swap(Err("store down".into())));
    assert!(refused.is_empty(), "{refused:?}");
    assert!(w.p.step(PrimaryEvent::Tick { now_ms: 50 }).is_empty(), "no retry before store_retry_ms");
    assert_eq!(w.p.step(PrimaryEvent::Tick { now_ms: 100 }), vec![swap]);
    let done = w.p.step(PrimaryEvent::Swap(Ok(SwapAnswer::Swapped { generation: 2 })));
    assert_eq!(done, vec![PrimaryAction::ReleaseOutputs { up_to_epoch: 3 }, PrimaryAction::Detached { generation: 2 }]);
}

#[test]
fn unprotect_that_finds_another_owner_stops_releasing_nothing() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"held");
    w.p.step(PrimaryEvent::Unprotect);
    let answer = SwapAnswer::Conflict { generation: Some(2), owner: "backup".into(), ended: None };
    let actions = w.p.step(PrimaryEvent::Swap(Ok(answer)));
    assert!(matches!(actions[..], [PrimaryAction::Stop { error: ProtocolError::OwnershipLost { .. } }]), "{actions:?}");
}

// Live migration: a switchover hands the VM over whole, or leaves it with the primary.

fn switch_over(w: &mut World) {
    let actions = w.p.step(PrimaryEvent::Switchover { paused_at_unix_us: 1234 });
    w.on_p(actions);
}

#[test]
fn a_switchover_hands_the_vm_to_the_backup_once_the_final_checkpoint_is_acknowledged() {
    let mut w = protected_world();
    w.checkpoint(3, b"final");
    switch_over(&mut w);
    w.settle();
    assert_eq!(w.releases(), vec![1, 2, 3], "every output left before the switchover");
    assert_eq!(w.record, Record { generation: 2, owner: "backup", ended: None });
    assert!(w.b_log.contains(&BackupAction::GoLive { epoch: 3, icount: 300, generation: 2 }), "{:?}", w.b_log);
    assert!(w.p_log.contains(&PrimaryAction::Stop { error: ProtocolError::HandedOver { generation: 2 } }));
    assert_eq!(w.b.handover(), Some(Handover { paused_at_unix_us: 1234, confirmed: true }));
}

#[test]
fn a_backup_that_took_the_record_and_vanished_before_confirming_loses_the_vm_to_the_primary() {
    let mut w = protected_world();
    w.checkpoint(3, b"final");
    switch_over(&mut w);
    // The backup takes the record; its SwitchedOver never arrives.
    let bytes = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    w.on_b(actions);
    assert_eq!(w.record.owner, "backup");
    w.disconnect();
    w.tick(10);
    // It never ran (it waits for HandedOver), so the primary takes the VM back by swapping
    // the backup's generation, and the backup, swapping it too, loses and stands down.
    assert!(w.p_log.contains(&PrimaryAction::Detached { generation: 3 }), "{:?}", w.p_log);
    assert_eq!(w.record, Record { generation: 3, owner: "primary", ended: None });
    assert!(w.b_log.contains(&BackupAction::StandDown), "{:?}", w.b_log);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })), "{:?}", w.b_log);
}

#[test]
fn a_backup_without_the_primary_s_word_swaps_again_before_it_runs() {
    let mut w = protected_world();
    w.checkpoint(3, b"final");
    switch_over(&mut w);
    let bytes = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    w.on_b(actions);
    // The primary died: its HandedOver never comes; the backup fences it off and runs.
    w.to_p.clear();
    let actions = w.b.step(BackupEvent::Tick { now_ms: 2000 });
    w.on_b(actions);
    assert_eq!(w.record, Record { generation: 3, owner: "backup", ended: None });
    assert!(w.b_log.contains(&BackupAction::GoLive { epoch: 3, icount: 300, generation: 3 }), "{:?}", w.b_log);
    assert_eq!(w.b.handover().map(|h| h.confirmed), Some(false));
}

#[test]
fn a_switchover_whose_final_checkpoint_is_not_acknowledged_is_called_off_as_an_unprotect() {
    let mut w = protected_world();
    w.disconnect();
    w.checkpoint(3, b"final");
    switch_over(&mut w);
    w.tick(10);
    assert!(w.p_log.contains(&PrimaryAction::Detached { generation: 2 }), "{:?}", w.p_log);
    assert_eq!(w.record, Record { generation: 2, owner: "primary", ended: None });
    assert_eq!(w.releases(), vec![1, 2, 3], "released once the backup's state is stale");
}

#[test]
fn the_switchover_goes_right_behind_the_final_checkpoint_and_the_claim_overlaps_its_apply() {
    let mut w = protected_world();
    w.defer_applies = true;
    let taken = PrimaryEvent::CheckpointTaken {
        epoch: 3,
        icount: 300,
        kind: CheckpointKind::Incremental,
        payload: b"final".to_vec(),
    };
    let actions = w.p.step(taken);
    w.on_p(actions);
    switch_over(&mut w);
    // No acknowledgement of epoch 3 was waited for: both are on the wire, in that order.
    assert_eq!(w.releases(), vec![1, 2]);
    let bytes = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    w.on_b(actions);
    // The record is swapped while the machine still applies the final checkpoint, and the
    // backup says nothing yet: the primary neither stops nor releases the final epoch.
    assert_eq!(w.deferred, vec![3]);
    assert_eq!(w.record, Record { generation: 2, owner: "backup", ended: None });
    w.settle();
    assert!(w.p.stopped().is_none(), "{:?}", w.p_log);
    assert_eq!(w.releases(), vec![1, 2]);
    // Applied: Ack and SwitchedOver; the primary releases epoch 3 and hands the VM over.
    w.apply_deferred();
    w.settle();
    assert_eq!(w.releases(), vec![1, 2, 3]);
    assert!(w.p_log.contains(&PrimaryAction::Stop { error: ProtocolError::HandedOver { generation: 2 } }));
    assert!(w.b_log.contains(&BackupAction::GoLive { epoch: 3, icount: 300, generation: 2 }), "{:?}", w.b_log);
    assert_eq!(w.b.handover(), Some(Handover { paused_at_unix_us: 1234, confirmed: true }));
}

#[test]
fn a_switchover_s_claim_is_the_one_whose_durability_may_wait_for_the_handover() {
    let mut w = protected_world();
    w.checkpoint(3, b"final");
    let actions = w.p.step(PrimaryEvent::Switchover { paused_at_unix_us: 1 });
    let bytes = sends(actions);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    assert_eq!(actions, vec![BackupAction::ClaimOwnership { generation: 1 }]);
    assert!(w.b.claim_awaits_handover());
    // Without HandedOver the backup swaps again, and that swap it acts on at once.
    let actions = w.b.step(BackupEvent::Claim(Ok(SwapAnswer::Swapped { generation: 2 })));
    assert!(!w.b.claim_awaits_handover(), "{actions:?}");
    let actions = w.b.step(BackupEvent::Tick { now_ms: 5000 });
    assert!(actions.contains(&BackupAction::ClaimOwnership { generation: 2 }), "{actions:?}");
    assert!(!w.b.claim_awaits_handover());
}

#[test]
fn a_final_checkpoint_that_fails_to_apply_during_the_claim_leaves_the_vm_with_the_primary() {
    let mut w = protected_world();
    w.defer_applies = true;
    let taken = PrimaryEvent::CheckpointTaken {
        epoch: 3,
        icount: 300,
        kind: CheckpointKind::Incremental,
        payload: b"final".to_vec(),
    };
    let actions = w.p.step(taken);
    w.on_p(actions);
    switch_over(&mut w);
    let bytes = std::mem::take(&mut w.to_b);
    let actions = w.b.step(BackupEvent::Received { conn: w.conn, bytes: &bytes });
    w.on_b(actions);
    assert_eq!(w.record.owner, "backup");
    let actions = w.b.step(BackupEvent::ApplyFailed { epoch: 3, reason: "bad page".into() });
    w.on_b(actions);
    w.deferred.clear();
    w.settle();
    w.disconnect();
    w.tick(5000);
    // The backup never ran and holds nothing to run; the primary takes the VM back past it.
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::GoLive { .. })), "{:?}", w.b_log);
    assert!(w.p_log.contains(&PrimaryAction::Detached { generation: 3 }), "{:?}", w.p_log);
    assert_eq!(w.record, Record { generation: 3, owner: "primary", ended: None });
}

/// A backup alone (no primary ever heard), fed `records` one per read: the actions of the
/// ticks, a second apart.
fn lone_backup_reads(records: &[Option<RecordView>]) -> Vec<BackupAction> {
    let mut b = Backup::new(backup_config(), 0);
    let mut log = Vec::new();
    let mut records = records.iter();
    for now_ms in (0..).step_by(1000).take(records.len() + 2) {
        for action in b.step(BackupEvent::Tick { now_ms }) {
            if action == BackupAction::ReadOwnership {
                let record = records.next().cloned().flatten();
                log.extend(b.step(BackupEvent::Ownership(Ok(record))));
            }
            log.push(action);
        }
    }
    log
}

fn view(generation: u64, ended: Option<u32>) -> Option<RecordView> {
    Some(RecordView { generation, owner: "p".into(), ended })
}

/// A protection cut short: the VM ended before its primary ever got through to this backup
/// (it was frozen, say). Reading the record, the backup exits with the VM's status instead
/// of waiting for ever. (Found from outside: `ftvm backup` waited for ever after `ctl stop`
/// during `ctl protect` with the backup SIGSTOPped.)
#[test]
fn a_backup_that_never_heard_its_primary_exits_once_the_record_says_the_vm_ended() {
    let log = lone_backup_reads(&[view(1, None), view(1, None), view(2, Some(3))]);
    assert!(log.contains(&BackupAction::Exit { exit_code: 3 }), "{log:?}");
    let log = lone_backup_reads(&[None, view(1, Some(0))]);
    assert!(log.contains(&BackupAction::Exit { exit_code: 0 }), "no record at first, then an ended one: {log:?}");
}

/// An end recorded before the backup first looked belongs to an earlier run of the VM,
/// which a new primary may start again: the backup keeps waiting for it.
#[test]
fn a_backup_started_for_a_vm_that_had_ended_waits_for_its_next_run() {
    let log = lone_backup_reads(&[view(4, Some(0)), view(4, Some(0)), view(4, Some(0))]);
    assert!(!log.iter().any(|a| matches!(a, BackupAction::Exit { .. })), "{log:?}");
    assert!(log.iter().filter(|a| **a == BackupAction::ReadOwnership).count() >= 3, "it keeps watching: {log:?}");
}

// A backup whose process restarted (`ftvm backup --resilient`) resumes from what it kept.

/// The backup's process dies (its connection with it) and a new one resumes from what the
/// old one kept: a backup core rebuilt with [`Backup::resume`].
fn restart_backup(w: &mut World) {
    let kept = w.b.kept().expect("the backup holds a whole checkpoint");
    w.disconnect();
    w.b = Backup::resume(patient_backup(), w.now_ms, kept);
}

#[test]
fn a_resumed_backup_gets_the_kept_incrementals_not_a_full_checkpoint() {
    let mut w = protected_world();
    restart_backup(&mut w);
    assert_eq!(w.b.state_generation(), Some(1), "the state still counts for its generation");
    w.checkpoint(3, b"taken while the backup restarted");
    w.connect();
    w.checkpoint(4, b"live");
    let epochs: Vec<_> = w.applied.iter().map(|(e, base, _)| (*e, *base)).collect();
    assert_eq!(epochs, vec![(1, None), (2, Some(1)), (3, Some(2)), (4, Some(3))]);
    assert_eq!(w.p.acked_epoch(), Some(4));
    assert_eq!(w.p.protection(), Protection::Protected);
    assert_eq!(w.record.generation, 1, "no swap: the primary stayed protected");
}

#[test]
fn a_resumed_backup_takes_over_a_primary_that_died_while_it_restarted() {
    let mut w = protected_world();
    w.tick(10);
    restart_backup(&mut w);
    // The primary died too and never comes back: the failover timeout counts from the restart.
    let actions = w.b.step(BackupEvent::Tick { now_ms: 1009 });
    w.on_b(actions);
    assert!(!w.b_log.iter().any(|a| matches!(a, BackupAction::ClaimOwnership { .. })), "{:?}", w.b_log);
    let actions = w.b.step(BackupEvent::Tick { now_ms: 1010 });
    w.on_b(actions);
    assert!(w.b_log.contains(&BackupAction::GoLive { epoch: 2, icount: 200, generation: 2 }), "{:?}", w.b_log);
    assert_eq!(w.record, Record { generation: 2, owner: "backup", ended: None });
}

#[test]
fn a_resumed_backup_whose_primary_went_unprotected_meanwhile_is_protected_again_by_incrementals() {
    let mut w = protected_world();
    restart_backup(&mut w);
    w.checkpoint(3, b"released unprotected");
    w.tick(200); // the grace period: swapped to generation 2, released
    assert_eq!(w.record.generation, 2);
    w.connect();
    assert_eq!(w.b.status().newest_generation, 2);
    w.checkpoint(4, b"live");
    let epochs: Vec<_> = w.applied.iter().map(|(e, base, _)| (*e, *base)).collect();
    assert_eq!(epochs, vec![(1, None), (2, Some(1)), (3, Some(2)), (4, Some(3))]);
    assert_eq!(w.p.protection(), Protection::Protected);
    assert_eq!(w.b.state_generation(), Some(2));
}

// A primary whose process restarted (`ftvm run --resilient --replicate-to`) takes its run up.

/// The primary's process dies and a new one takes its run up: it took epochs up to `last`,
/// and knows every page written since `since`.
fn restart_primary(w: &mut World, last: u64, since: u64) {
    w.disconnect();
    let generation = w.p.generation();
    w.p = Primary::resume(primary_config(), generation, w.now_ms, ResumeRun { last_epoch: last, since_epoch: since });
}

fn applied_epochs(w: &World) -> Vec<(u64, Option<u64>)> {
    w.applied.iter().map(|(e, base, _)| (*e, *base)).collect()
}

#[test]
fn a_resumed_primary_brings_its_backup_up_to_date_with_an_incremental_on_an_older_epoch() {
    let mut w = protected_world();
    w.checkpoint(3, b"acked");
    w.disconnect();
    w.checkpoint(4, b"never reached the backup");
    restart_primary(&mut w, 4, 3);
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Incremental);
    w.connect();
    w.checkpoint(5, b"every page since 3");
    w.checkpoint(6, b"delta");
    assert_eq!(applied_epochs(&w), vec![(1, None), (2, Some(1)), (3, Some(2)), (5, Some(3)), (6, Some(5))]);
    assert_eq!(w.p.acked_epoch(), Some(6));
    assert_eq!(w.p.protection(), Protection::Protected);
    assert_eq!(w.b.state_generation(), Some(1), "the same run: the backup's right still counts");
}

#[test]
fn a_resumed_run_fits_a_backup_that_got_more_than_the_last_acknowledged_epoch() {
    let mut w = protected_world();
    w.checkpoint(3, b"acked, but the dead primary recorded its acknowledgement up to 2 only");
    restart_primary(&mut w, 3, 2);
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Incremental);
    w.checkpoint(4, b"every page since 2");
    assert_eq!(w.applied.last(), Some(&(4, Some(2), b"every page since 2".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(4));
}

#[test]
fn a_resumed_run_gives_a_backup_that_holds_less_a_full_checkpoint() {
    let mut w = protected_world();
    restart_primary(&mut w, 2, 2);
    w.b = Backup::new(patient_backup(), w.now_ms); // a fresh backup: nothing of the run
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
    w.checkpoint(3, b"full");
    assert_eq!(w.applied.last(), Some(&(3, None, b"full".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(3));
}

#[test]
fn a_resumed_runs_first_checkpoint_kept_for_a_backup_that_holds_less_is_dropped_for_a_full() {
    let mut w = protected_world();
    restart_primary(&mut w, 2, 2);
    w.checkpoint(3, b"every page since 2"); // taken before any backup is heard: kept
    w.b = Backup::new(patient_backup(), w.now_ms);
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
    w.checkpoint(4, b"full");
    assert_eq!(w.applied.last(), Some(&(4, None, b"full".to_vec())));
}

#[test]
fn a_backup_refuses_a_base_that_is_not_before_the_epoch() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1, 1);
    let begin = Message::CheckpointBegin { epoch: 3, base_epoch: Some(3), icount: 0, total_bytes: 1 };
    let actions = fake.send(&mut b, begin);
    assert!(matches!(closes(&actions)[..], [ProtocolError::MalformedCheckpoint { epoch: 3, .. }]), "{actions:?}");
}
