//! The two state machines wired back to back, event by event.

use super::*;
use crate::lease::{AcquireOutcome, LeaseError, LeaseRecord, RenewOutcome};
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

/// A primary and a backup joined by a perfect wire; the backup's machine applies at once.
struct World {
    p: Primary,
    b: Backup,
    to_b: Vec<u8>,
    to_p: Vec<u8>,
    p_log: Vec<PrimaryAction>,
    b_log: Vec<BackupAction>,
    applied: Vec<(u64, Option<u64>, Vec<u8>)>,
    now_ms: u64,
}

impl World {
    fn new() -> Self {
        Self::with(primary_config(), backup_config())
    }

    fn with(p: PrimaryConfig, b: BackupConfig) -> Self {
        World {
            p: Primary::new(p, LeaseGrant { term: 1, acquired_at_ms: 0 }),
            b: Backup::new(b, 0),
            to_b: Vec::new(),
            to_p: Vec::new(),
            p_log: Vec::new(),
            b_log: Vec::new(),
            applied: Vec::new(),
            now_ms: 0,
        }
    }

    fn on_p(&mut self, actions: Vec<PrimaryAction>) {
        for action in actions {
            match action {
                PrimaryAction::Send(bytes) => self.to_b.extend(bytes),
                PrimaryAction::RenewLease { term } => {
                    let record = LeaseRecord { holder: "p".into(), term, expires_ms: self.now_ms + 3000 };
                    let more = self.p.step(PrimaryEvent::LeaseRenewal(Ok(RenewOutcome::Renewed(record))));
                    self.on_p(more);
                }
                other => self.p_log.push(other),
            }
        }
    }

    fn on_b(&mut self, actions: Vec<BackupAction>) {
        for action in actions {
            match action {
                BackupAction::Send(bytes) => self.to_p.extend(bytes),
                BackupAction::ApplyCheckpoint { epoch, base_epoch, payload, .. } => {
                    self.applied.push((epoch, base_epoch, payload));
                    let more = self.b.step(BackupEvent::CheckpointApplied { epoch });
                    self.on_b(more);
                }
                other => self.b_log.push(other),
            }
        }
    }

    fn settle(&mut self) {
        while !self.to_b.is_empty() || !self.to_p.is_empty() {
            let bytes = std::mem::take(&mut self.to_b);
            let actions = self.b.step(BackupEvent::Received(&bytes));
            self.on_b(actions);
            let bytes = std::mem::take(&mut self.to_p);
            let actions = self.p.step(PrimaryEvent::Received(&bytes));
            self.on_p(actions);
        }
    }

    fn connect(&mut self) {
        let actions = self.b.step(BackupEvent::Connected { nonce: B_NONCE });
        self.on_b(actions);
        let actions = self.p.step(PrimaryEvent::Connected { nonce: P_NONCE });
        self.on_p(actions);
        self.settle();
    }

    fn disconnect(&mut self) {
        self.to_b.clear();
        self.to_p.clear();
        let actions = self.p.step(PrimaryEvent::Disconnected);
        self.on_p(actions);
        let actions = self.b.step(BackupEvent::Disconnected);
        self.on_b(actions);
    }

    fn checkpoint(&mut self, epoch: u64, payload: &[u8]) {
        let kind = self.p.next_checkpoint_kind();
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
        self.b_log
            .iter()
            .filter_map(|a| if let BackupAction::Close { error } = a { Some(error) } else { None })
            .collect()
    }
}

/// A hand-driven primary for feeding a backup what a real primary never would.
struct FakePrimary {
    encoder: Encoder,
}

impl FakePrimary {
    /// Connects `b` and completes the handshake with the given Hello fields.
    fn handshake(b: &mut Backup, term: u64) -> (FakePrimary, Vec<BackupAction>) {
        b.step(BackupEvent::Connected { nonce: B_NONCE });
        let mut encoder = Encoder::new(psk().hello_key(Direction::PrimaryToBackup));
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            config_digest: DIGEST,
            nonce: P_NONCE,
            run_id: RUN,
            term,
        };
        let (t, payload) = hello.encode();
        let actions = b.step(BackupEvent::Received(&encoder.encode(t, &payload).unwrap()));
        encoder.set_key(psk().session_key(Direction::PrimaryToBackup, &P_NONCE, &B_NONCE));
        (FakePrimary { encoder }, actions)
    }

    fn send(&mut self, b: &mut Backup, message: Message) -> Vec<BackupAction> {
        let (t, payload) = message.encode();
        b.step(BackupEvent::Received(&self.encoder.encode(t, &payload).unwrap()))
    }
}

fn sha(payload: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(payload).into()
}

fn closes(actions: &[BackupAction]) -> Vec<&ProtocolError> {
    actions.iter().filter_map(|a| if let BackupAction::Close { error } = a { Some(error) } else { None }).collect()
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
    let actions =
        w.p.step(PrimaryEvent::CheckpointTaken { epoch: 1, icount: 0, kind: CheckpointKind::Full, payload: b"x" });
    let bytes: Vec<u8> =
        actions.into_iter().flat_map(|a| if let PrimaryAction::Send(b) = a { b } else { vec![] }).collect();
    let actions = w.b.step(BackupEvent::Received(&bytes));
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
    b.step(BackupEvent::Connected { nonce: B_NONCE });
    let hello = Message::Hello {
        protocol_version: 9,
        role: Role::Primary,
        config_digest: DIGEST,
        nonce: P_NONCE,
        run_id: 1,
        term: 1,
    };
    let (t, payload) = hello.encode();
    let frame = Encoder::new(psk().hello_key(Direction::PrimaryToBackup)).encode(t, &payload).unwrap();
    let actions = b.step(BackupEvent::Received(&frame));
    let expected = ProtocolError::ProtocolVersionMismatch { ours: PROTOCOL_VERSION, theirs: 9 };
    assert_eq!(closes(&actions), vec![&expected]);
    assert!(expected.to_string().contains("version 1") && expected.to_string().contains("version 9"));
}

#[test]
fn a_stranger_is_refused_at_its_first_byte() {
    let mut b = Backup::new(backup_config(), 0);
    b.step(BackupEvent::Connected { nonce: B_NONCE });
    let actions = b.step(BackupEvent::Received(b"GET / HTTP/1.1\r\n"));
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
        payload: b"second, never whole",
    });
    let bytes: Vec<u8> =
        actions.into_iter().flat_map(|a| if let PrimaryAction::Send(b) = a { b } else { vec![] }).collect();
    let actions = w.b.step(BackupEvent::Received(&bytes[..bytes.len() - 10]));
    assert!(actions.iter().all(|a| !matches!(a, BackupAction::ApplyCheckpoint { .. })));
    let actions = w.b.step(BackupEvent::Disconnected);
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(WireError::Truncated { .. })]));
    assert_eq!(w.b.applied(), Some(CheckpointId { run_id: RUN, epoch: 1 }));
}

#[test]
fn a_corrupted_chunk_closes_the_connection_without_applying() {
    let mut w = World::new();
    w.connect();
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 1,
        icount: 0,
        kind: CheckpointKind::Full,
        payload: b"abcdefgh",
    });
    let mut bytes: Vec<u8> =
        actions.into_iter().flat_map(|a| if let PrimaryAction::Send(b) = a { b } else { vec![] }).collect();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    let actions = w.b.step(BackupEvent::Received(&bytes));
    assert!(actions.iter().all(|a| !matches!(a, BackupAction::ApplyCheckpoint { .. })));
    assert!(matches!(closes(&actions)[..], [ProtocolError::Wire(_)]));
    assert_eq!(w.b.applied(), None);
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
fn an_epoch_taken_while_disconnected_forces_a_full_checkpoint() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.checkpoint(2, b"lost delta");
    w.connect();
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
    w.checkpoint(3, b"full again");
    assert_eq!(w.applied.last(), Some(&(3, None, b"full again".to_vec())));
    assert_eq!(w.p.acked_epoch(), Some(3));
}

#[test]
fn an_incremental_taken_against_advice_is_dropped_not_sent() {
    let mut w = World::new();
    w.connect();
    let actions = w.p.step(PrimaryEvent::CheckpointTaken {
        epoch: 1,
        icount: 0,
        kind: CheckpointKind::Incremental,
        payload: b"d",
    });
    assert!(actions.is_empty());
    assert_eq!(w.p.next_checkpoint_kind(), CheckpointKind::Full);
}

#[test]
fn a_backup_refuses_an_incremental_that_misses_its_base_and_asks_for_a_full() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
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
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
    let actions =
        fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 1 << 40 });
    let expected = ProtocolError::CheckpointTooLarge { epoch: 1, total_bytes: 1 << 40, limit: 1024 };
    assert_eq!(closes(&actions), vec![&expected]);
}

#[test]
fn a_digest_mismatch_is_never_applied() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
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
        let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
        fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 2 });
        let actions = fake.send(&mut b, chunk);
        assert!(matches!(closes(&actions)[..], [ProtocolError::MalformedCheckpoint { epoch: 1, .. }]), "{actions:?}");
    }
}

#[test]
fn a_short_checkpoint_is_malformed_at_its_end() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 2 });
    fake.send(&mut b, Message::CheckpointChunk { epoch: 1, offset: 0, bytes: vec![1] });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 1, digest: sha(&[1]) });
    assert!(matches!(closes(&actions)[..], [ProtocolError::MalformedCheckpoint { epoch: 1, .. }]));
}

#[test]
fn epochs_must_increase_within_a_run() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 5, base_epoch: None, icount: 0, total_bytes: 0 });
    let actions = fake.send(&mut b, Message::CheckpointEnd { epoch: 5, digest: sha(&[]) });
    b.step(BackupEvent::CheckpointApplied { epoch: 5 });
    assert_eq!(actions.len(), 1);
    let actions = fake.send(&mut b, Message::CheckpointBegin { epoch: 5, base_epoch: None, icount: 0, total_bytes: 0 });
    assert_eq!(closes(&actions), vec![&ProtocolError::EpochNotIncreasing { latest: 5, got: 5 }]);
}

#[test]
fn a_primary_of_an_older_term_is_refused() {
    let mut b = Backup::new(backup_config(), 0);
    FakePrimary::handshake(&mut b, 5);
    let (_, actions) = FakePrimary::handshake(&mut b, 4);
    assert_eq!(closes(&actions), vec![&ProtocolError::StaleTerm { seen: 5, theirs: 4 }]);
}

#[test]
fn a_replayed_session_frame_fails_on_another_connection() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
    let (t, payload) = Message::Heartbeat { now_ms: 1, epoch: 0 }.encode();
    let recorded = fake.encoder.encode(t, &payload).unwrap();
    b.step(BackupEvent::Received(&recorded));
    // A new connection: same primary nonce, but the backup picks a fresh one.
    b.step(BackupEvent::Connected { nonce: [3; 16] });
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Primary,
        config_digest: DIGEST,
        nonce: P_NONCE,
        run_id: RUN,
        term: 1,
    };
    let (t, payload) = hello.encode();
    b.step(BackupEvent::Received(
        &Encoder::new(psk().hello_key(Direction::PrimaryToBackup)).encode(t, &payload).unwrap(),
    ));
    let actions = b.step(BackupEvent::Received(&recorded));
    assert_eq!(closes(&actions), vec![&ProtocolError::Wire(WireError::BadAuthentication { seq: 1 })]);
}

#[test]
fn a_silent_primary_makes_the_backup_win_the_lease_then_go_live_from_its_last_checkpoint() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.checkpoint(2, b"delta");
    w.disconnect();
    let actions = w.b.step(BackupEvent::Tick { now_ms: 999 });
    assert!(actions.is_empty());
    let actions = w.b.step(BackupEvent::Tick { now_ms: 1000 });
    assert_eq!(actions, vec![BackupAction::AcquireLease]);
    let record = LeaseRecord { holder: "backup".into(), term: 2, expires_ms: 5000 };
    let actions = w.b.step(BackupEvent::LeaseAcquisition(Ok(AcquireOutcome::Acquired(record))));
    assert_eq!(actions, vec![BackupAction::GoLive { epoch: 2, icount: 200, term: 2 }]);
    assert!(w.b.is_live());
}

#[test]
fn a_busy_lease_is_retried_later_and_a_returning_primary_cancels_the_takeover() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    assert_eq!(w.b.step(BackupEvent::Tick { now_ms: 1000 }), vec![BackupAction::AcquireLease]);
    let record = LeaseRecord { holder: "primary".into(), term: 1, expires_ms: 3000 };
    assert!(w.b.step(BackupEvent::LeaseAcquisition(Ok(AcquireOutcome::Busy(record)))).is_empty());
    assert!(w.b.step(BackupEvent::Tick { now_ms: 1249 }).is_empty());
    assert_eq!(w.b.step(BackupEvent::Tick { now_ms: 1250 }), vec![BackupAction::AcquireLease]);
    let error = LeaseError::Corrupt { path: "x".into(), reason: "test".into() };
    assert!(w.b.step(BackupEvent::LeaseAcquisition(Err(&error))).is_empty());
    w.tick(1300);
    w.connect();
    w.tick(1600);
    assert!(w.b_log.iter().all(|a| *a != BackupAction::AcquireLease), "{:?}", w.b_log);
}

#[test]
fn a_backup_without_a_checkpoint_never_seeks_the_lease() {
    let mut w = World::new();
    w.connect();
    w.disconnect();
    assert!(w.b.step(BackupEvent::Tick { now_ms: 100_000 }).is_empty());
}

#[test]
fn a_live_backup_turns_primaries_away() {
    let mut w = World::new();
    w.connect();
    w.checkpoint(1, b"full");
    w.disconnect();
    w.b.step(BackupEvent::Tick { now_ms: 1000 });
    let record = LeaseRecord { holder: "backup".into(), term: 2, expires_ms: 5000 };
    w.b.step(BackupEvent::LeaseAcquisition(Ok(AcquireOutcome::Acquired(record))));
    let actions = w.b.step(BackupEvent::Connected { nonce: B_NONCE });
    assert_eq!(closes(&actions), vec![&ProtocolError::AlreadyLive]);
}

#[test]
fn a_failed_apply_leaves_nothing_to_go_live_from_and_asks_for_a_full_checkpoint() {
    let mut b = Backup::new(backup_config(), 0);
    let (mut fake, _) = FakePrimary::handshake(&mut b, 1);
    fake.send(&mut b, Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 0, total_bytes: 0 });
    fake.send(&mut b, Message::CheckpointEnd { epoch: 1, digest: sha(&[]) });
    let actions = b.step(BackupEvent::ApplyFailed { epoch: 1, reason: "bad page".into() });
    assert!(matches!(closes(&actions)[..], [ProtocolError::ApplyFailed { epoch: 1, .. }]));
    assert_eq!(b.applied(), None);
    assert!(b.step(BackupEvent::Tick { now_ms: 100_000 }).is_empty());
}

#[test]
fn the_primary_renews_its_lease_and_stops_when_it_is_lost() {
    let mut p = Primary::new(primary_config(), LeaseGrant { term: 3, acquired_at_ms: 0 });
    assert!(p.step(PrimaryEvent::Tick { now_ms: 499 }).is_empty());
    assert_eq!(p.step(PrimaryEvent::Tick { now_ms: 500 }), vec![PrimaryAction::RenewLease { term: 3 }]);
    let record = LeaseRecord { holder: "backup".into(), term: 4, expires_ms: 9000 };
    let actions = p.step(PrimaryEvent::LeaseRenewal(Ok(RenewOutcome::Lost(Some(record)))));
    let error = ProtocolError::LeaseLost { holder: "backup".into(), term: 4, our_term: 3 };
    assert_eq!(actions, vec![PrimaryAction::Stop { error }]);
    assert!(!p.is_live(501));
    assert!(p.step(PrimaryEvent::Tick { now_ms: 10_000 }).is_empty());
}

#[test]
fn the_primary_stops_when_its_lease_expires_unrenewed() {
    let mut p = Primary::new(primary_config(), LeaseGrant { term: 1, acquired_at_ms: 0 });
    p.step(PrimaryEvent::Tick { now_ms: 500 });
    let error = LeaseError::Corrupt { path: "vm.lease".into(), reason: "test".into() };
    assert!(p.step(PrimaryEvent::LeaseRenewal(Err(&error))).is_empty());
    assert!(p.is_live(2999));
    let actions = p.step(PrimaryEvent::Tick { now_ms: 3000 });
    assert!(matches!(&actions[..], [.., PrimaryAction::Stop { error: ProtocolError::LeaseExpired { last_error } }]
        if last_error.contains("vm.lease")));
}

#[test]
fn a_renewal_counts_from_when_it_was_asked() {
    let mut p = Primary::new(primary_config(), LeaseGrant { term: 1, acquired_at_ms: 0 });
    p.step(PrimaryEvent::Tick { now_ms: 500 });
    p.step(PrimaryEvent::Tick { now_ms: 2000 });
    let record = LeaseRecord { holder: "p".into(), term: 1, expires_ms: 5000 };
    p.step(PrimaryEvent::LeaseRenewal(Ok(RenewOutcome::Renewed(record))));
    assert!(p.is_live(3499));
    assert!(!p.is_live(3500));
}

#[test]
fn a_silent_backup_is_dropped_and_a_stalled_handshake_times_out() {
    let mut w = World::new();
    w.connect();
    w.p.step(PrimaryEvent::Tick { now_ms: 999 });
    let actions = w.p.step(PrimaryEvent::Tick { now_ms: 1000 });
    assert!(actions
        .iter()
        .any(|a| matches!(a, PrimaryAction::Close { error: ProtocolError::PeerSilent { silent_ms: 1000 } })));
    let mut p = Primary::new(primary_config(), LeaseGrant { term: 1, acquired_at_ms: 0 });
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
    encoder.encode(0, &[]).unwrap();
    let actions = w.p.step(PrimaryEvent::Received(&encoder.encode(t, &payload).unwrap()));
    assert!(actions.contains(&PrimaryAction::Close { error: ProtocolError::AckOfUnsentEpoch { epoch: 9, sent: None } }));
}
