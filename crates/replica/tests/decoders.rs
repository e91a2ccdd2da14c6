//! Fuzz-style properties of everything that parses outside data: the frame decoder, the
//! message decoder, and the two state machines fed hostile frames. Nothing may panic, a
//! mutated frame never passes as a different one (not even with its CRC32C made to match: the
//! AEAD tag catches it), and errors are final.

use proptest::prelude::*;

use replica::wire::{Direction, Encoder, FrameKey};
use replica::{
    Backup, BackupConfig, BackupEvent, CheckpointId, Decoder, Frame, Message, PresharedKey, Primary, PrimaryConfig,
    PrimaryEvent, Role,
};

const DIGEST: [u8; 32] = [1; 32];

fn key() -> FrameKey {
    FrameKey::from_secret(b"fuzz key")
}

fn psk() -> PresharedKey {
    PresharedKey::new(&[9; 32]).unwrap()
}

fn any_id() -> impl Strategy<Value = Option<CheckpointId>> {
    proptest::option::of((any::<u64>(), any::<u64>()).prop_map(|(run_id, epoch)| CheckpointId { run_id, epoch }))
}

fn any_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Backup)]
}

/// Any message, with small epochs so that some of them make sense to the peer.
fn any_message() -> impl Strategy<Value = Message> {
    let epoch = 0u64..6;
    prop_oneof![
        (any::<u16>(), any_role(), any::<[u8; 32]>(), any::<[u8; 16]>(), any::<u64>(), 0u64..3).prop_map(
            |(protocol_version, role, config_digest, nonce, run_id, generation)| Message::Hello {
                protocol_version,
                role,
                config_digest,
                nonce,
                run_id,
                generation
            }
        ),
        (
            (any::<u16>(), any_role(), any::<[u8; 32]>(), any::<[u8; 16]>(), any::<[u8; 16]>(), any_id()),
            proptest::option::of((any_id(), 0u64..40))
        )
            .prop_map(|((protocol_version, role, config_digest, nonce, primary_nonce, latest), partial)| {
                Message::HelloAck {
                    protocol_version,
                    role,
                    config_digest,
                    nonce,
                    primary_nonce,
                    latest,
                    partial: partial.and_then(|(id, offset)| id.map(|id| (id, offset))),
                }
            }),
        (0u64..6, 0u64..40).prop_map(|(epoch, offset)| Message::CheckpointResume { epoch, offset }),
        (0u64..4, 0u64..6).prop_map(|(generation, from_epoch)| Message::Protected { generation, from_epoch }),
        any::<u32>().prop_map(|exit_code| Message::End { exit_code }),
        Just(Message::StandDown),
        (0u64..6, 0u64..4, any::<u64>()).prop_map(|(epoch, generation, paused_at_unix_us)| Message::Switchover {
            epoch,
            generation,
            paused_at_unix_us
        }),
        (0u64..4).prop_map(|generation| Message::SwitchedOver { generation }),
        Just(Message::HandedOver),
        (0u64..60).prop_map(|from_seq| Message::Resend { from_seq }),
        (any::<u64>(), epoch.clone()).prop_map(|(now_ms, epoch)| Message::Heartbeat { now_ms, epoch }),
        (epoch.clone(), proptest::option::of(0u64..6), any::<u64>(), 0u64..40).prop_map(
            |(epoch, base_epoch, icount, total_bytes)| Message::CheckpointBegin {
                epoch,
                base_epoch,
                icount,
                total_bytes
            }
        ),
        (epoch.clone(), 0u64..40, proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(epoch, offset, bytes)| Message::CheckpointChunk { epoch, offset, bytes }),
        (epoch.clone(), any::<[u8; 32]>()).prop_map(|(epoch, digest)| Message::CheckpointEnd { epoch, digest }),
        epoch.clone().prop_map(|epoch| Message::Ack { epoch }),
        (epoch, any_id()).prop_map(|(epoch, latest)| Message::NeedFull { epoch, latest }),
        ".{0,40}".prop_map(|reason| Message::Goodbye { reason }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Overwrite(usize, u8),
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::FlipBit),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn mutate(stream: &mut Vec<u8>, mutation: &Mutation) {
    if stream.is_empty() {
        return;
    }
    let len = stream.len();
    match *mutation {
        Mutation::FlipBit(i) => stream[(i / 8) % len] ^= 1 << (i % 8),
        Mutation::Insert(i, b) => stream.insert(i % (len + 1), b),
        Mutation::Delete(i) => {
            stream.remove(i % len);
        }
        Mutation::Truncate(i) => stream.truncate(i % len),
        Mutation::Overwrite(i, b) => stream[i % len] = b,
    }
}

/// Feeds `stream` in pieces of the given sizes; returns the frames and the error, if any.
fn decode(stream: &[u8], pieces: &[usize]) -> (Vec<Frame>, Option<replica::WireError>) {
    let mut decoder = Decoder::new(key());
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        decoder.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(decoder.next_frame(), Err(error.clone()), "errors are final");
                    return (frames, Some(error));
                }
            }
        }
    }
    (frames, decoder.finish().err())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        pieces in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let (frames, _) = decode(&bytes, &pieces);
        prop_assert!(frames.is_empty(), "random bytes passed as an authenticated frame");
    }

    #[test]
    fn random_bytes_after_a_valid_magic_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..40),
        pieces in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let mut bytes = b"FTVR\x02\x00".to_vec();
        bytes.extend(header);
        let (frames, _) = decode(&bytes, &pieces);
        prop_assert!(frames.is_empty());
    }

    #[test]
    fn a_mutated_stream_yields_only_original_frames_in_order(
        messages in proptest::collection::vec(any_message(), 1..6),
        mutations in proptest::collection::vec(any_mutation(), 1..4),
        pieces in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let mut encoder = Encoder::new(key());
        let mut originals = Vec::new();
        let mut stream = Vec::new();
        for (seq, message) in messages.iter().enumerate() {
            let (frame_type, payload) = message.encode();
            stream.extend(encoder.encode(frame_type, &payload).unwrap());
            originals.push(Frame { frame_type, seq: seq as u64, payload });
        }
        let pristine = stream.clone();
        for mutation in &mutations {
            mutate(&mut stream, mutation);
        }
        let (frames, error) = decode(&stream, &pieces);
        prop_assert_eq!(&frames[..], &originals[..frames.len()]);
        if stream != pristine {
            prop_assert!(error.is_some() || frames.len() < originals.len(), "a changed stream decoded whole");
        }
        for frame in &frames {
            prop_assert_eq!(Message::decode(frame), Ok(messages[frame.seq as usize].clone()));
        }
    }

    #[test]
    fn a_forged_frame_with_a_matching_crc_never_passes(
        messages in proptest::collection::vec(any_message(), 1..6),
        target in any::<usize>(),
        bit in any::<usize>(),
    ) {
        let mut encoder = Encoder::new(key());
        let mut frames: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                let (frame_type, payload) = m.encode();
                encoder.encode(frame_type, &payload).unwrap()
            })
            .collect();
        let target = target % frames.len();
        let forged = &mut frames[target];
        let crc_at = forged.len() - 4;
        forged[(bit / 8) % crc_at] ^= 1 << (bit % 8);
        let crc = crc32c::crc32c(&forged[..crc_at]);
        forged[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let (decoded, _) = decode(&frames.concat(), &[usize::MAX]);
        prop_assert!(decoded.len() <= target, "the forged frame {target} passed");
        for frame in &decoded {
            prop_assert_eq!(Message::decode(frame), Ok(messages[frame.seq as usize].clone()));
        }
    }

    #[test]
    fn random_payloads_never_panic_the_message_decoder_and_decode_canonically(
        frame_type in 0u8..12,
        payload in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let frame = Frame { frame_type, seq: 0, payload };
        if let Ok(message) = Message::decode(&frame) {
            if !matches!(message, Message::Goodbye { .. }) {
                prop_assert_eq!(message.encode(), (frame.frame_type, frame.payload));
            }
        }
    }

    #[test]
    fn a_backup_fed_authenticated_nonsense_never_panics(
        messages in proptest::collection::vec(any_message(), 0..24),
        real_hello in any::<bool>(),
    ) {
        let mut backup = Backup::new(BackupConfig::new(psk(), DIGEST, 64), 0);
        backup.step(BackupEvent::Connected { conn: 1, nonce: [2; 16] });
        let mut encoder = Encoder::new(psk().hello_key(Direction::PrimaryToBackup));
        if real_hello {
            let hello = Message::Hello {
                protocol_version: replica::PROTOCOL_VERSION,
                role: Role::Primary,
                config_digest: DIGEST,
                nonce: [1; 16],
                run_id: 7,
                generation: 1,
            };
            let (t, p) = hello.encode();
            backup.step(BackupEvent::Received { conn: 1, bytes: &encoder.encode(t, &p).unwrap() });
            encoder.set_key(psk().session_key(Direction::PrimaryToBackup, &[1; 16], &[2; 16]));
        }
        for (i, message) in messages.iter().enumerate() {
            let (t, p) = message.encode();
            for action in backup.step(BackupEvent::Received { conn: 1, bytes: &encoder.encode(t, &p).unwrap() }) {
                if let replica::BackupAction::ApplyCheckpoint { epoch, .. } = action {
                    backup.step(BackupEvent::CheckpointApplied { epoch });
                }
            }
            backup.step(BackupEvent::Tick { now_ms: i as u64 * 100 });
        }
    }

    #[test]
    fn a_primary_fed_authenticated_nonsense_never_panics(
        messages in proptest::collection::vec(any_message(), 0..24),
        real_ack in any::<bool>(),
    ) {
        let config = PrimaryConfig { chunk_bytes: 8, ..PrimaryConfig::new(psk(), DIGEST, 7) };
        let mut primary = Primary::new(config, 1, 0);
        primary.step(PrimaryEvent::Connected { nonce: [1; 16] });
        let mut encoder = Encoder::new(psk().hello_key(Direction::BackupToPrimary));
        if real_ack {
            let ack = Message::HelloAck {
                protocol_version: replica::PROTOCOL_VERSION,
                role: Role::Backup,
                config_digest: DIGEST,
                nonce: [2; 16],
                primary_nonce: [1; 16],
                latest: None,
                partial: None,
            };
            let (t, p) = ack.encode();
            primary.step(PrimaryEvent::Received(&encoder.encode(t, &p).unwrap()));
            encoder.set_key(psk().session_key(Direction::BackupToPrimary, &[1; 16], &[2; 16]));
        }
        for (i, message) in messages.iter().enumerate() {
            let epoch = i as u64 + 1;
            let kind = primary.next_checkpoint_kind();
            primary.step(PrimaryEvent::CheckpointTaken { epoch, icount: 0, kind, payload: b"state".to_vec() });
            let (t, p) = message.encode();
            primary.step(PrimaryEvent::Received(&encoder.encode(t, &p).unwrap()));
            primary.step(PrimaryEvent::Tick { now_ms: i as u64 * 10 });
        }
    }
}
