//! Arbitrary bytes, cut where the input says, into the frame decoder, the message decoder,
//! and a backup past its handshake (whose frames an attacker without the key cannot make, so
//! this mostly exercises the refusal paths; tests/decoders.rs covers keyed nonsense).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica::wire::FrameKey;
use replica::{Backup, BackupConfig, BackupEvent, Decoder, Message, PresharedKey};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let cut = usize::from(cut).min(bytes.len());

    let mut decoder = Decoder::new(FrameKey::from_secret(b"fuzz"));
    for piece in [&bytes[..cut], &bytes[cut..]] {
        decoder.push(piece);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let _ = Message::decode(&frame);
        }
    }
    let _ = decoder.finish();

    // The payload decoder on its own, with the first byte as the frame type.
    let frame = replica::Frame { frame_type: cut as u8, seq: 0, payload: bytes.to_vec() };
    let _ = Message::decode(&frame);

    let key = PresharedKey::new(&[7; 32]).expect("a 32-byte key");
    let mut backup = Backup::new(BackupConfig::new(key, [0; 32], 1 << 20), 0);
    backup.step(BackupEvent::Connected { nonce: [1; 16] });
    backup.step(BackupEvent::Received(&bytes[..cut]));
    backup.step(BackupEvent::Received(&bytes[cut..]));
    backup.step(BackupEvent::Disconnected);
});
