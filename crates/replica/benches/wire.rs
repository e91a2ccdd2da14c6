//! What sealing the replication channel costs: frames encoded and decoded per second with
//! ChaCha20-Poly1305 (the wire format), against the same framing with CRC32C only (no
//! cryptography: the floor) and with CRC32C + HMAC-SHA256 (wire version 1, authenticated in
//! clear). Prints MB/s of payload; asserts nothing about timing.
//!
//! `cargo bench -p replica --bench wire` (add `-- --quick` for a shorter run).

use std::hint::black_box;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use replica::wire::{Decoder, Encoder, FrameKey, HEADER_BYTES, TRAILER_BYTES};
use sha2::Sha256;

/// Runs `step` (which handles `bytes` of payload) until `budget` has passed; MB/s.
fn throughput(bytes: usize, budget: Duration, mut step: impl FnMut()) -> f64 {
    step(); // warm up
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < budget {
        step();
        rounds += 1;
    }
    (rounds as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e6
}

/// A frame of the same shape with only a CRC32C: header, payload, checksum.
fn plain_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len() + 4);
    frame.extend_from_slice(&[0; HEADER_BYTES]);
    frame.extend_from_slice(payload);
    let crc = crc32c::crc32c(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

fn plain_open(frame: &[u8]) -> Vec<u8> {
    let crc_at = frame.len() - 4;
    assert_eq!(crc32c::crc32c(&frame[..crc_at]).to_le_bytes(), frame[crc_at..]);
    frame[HEADER_BYTES..crc_at].to_vec()
}

/// Wire version 1's frame: CRC32C and HMAC-SHA256 over header and payload.
fn hmac_frame(mac: &Hmac<Sha256>, payload: &[u8]) -> Vec<u8> {
    let mut frame = plain_frame(payload);
    let covered = frame.len() - 4;
    let mut mac = mac.clone();
    mac.update(&frame[..covered]);
    frame.extend_from_slice(&mac.finalize().into_bytes());
    frame
}

fn hmac_open(mac: &Hmac<Sha256>, frame: &[u8]) -> Vec<u8> {
    let tag_at = frame.len() - 32;
    let mut mac = mac.clone();
    mac.update(&frame[..tag_at - 4]);
    mac.verify_slice(&frame[tag_at..]).expect("tag");
    plain_open(&frame[..tag_at])
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 150 } else { 600 });
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(&[5; 32]).expect("any key length");
    println!("wire frame cost, MB/s of payload (one core; encode = seal, decode = check + open)");
    println!("{:>9} | {:^29} | {:^29}", "", "encode", "decode");
    println!(
        "{:>9} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
        "payload", "crc only", "crc+hmac", "sealed", "crc only", "crc+hmac", "sealed"
    );
    for size in [4 << 10, 64 << 10, 1 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut encoder = Encoder::new(FrameKey::from_secret(b"bench"));
        let enc_plain = throughput(size, budget, || drop(black_box(plain_frame(&payload))));
        let enc_hmac = throughput(size, budget, || drop(black_box(hmac_frame(&mac, &payload))));
        let enc_sealed = throughput(size, budget, || drop(black_box(encoder.encode(1, &payload).expect("encode"))));

        let plain = plain_frame(&payload);
        let hmac = hmac_frame(&mac, &payload);
        let dec_plain = throughput(size, budget, || drop(black_box(plain_open(&plain))));
        let dec_hmac = throughput(size, budget, || drop(black_box(hmac_open(&mac, &hmac))));
        // A decoder checks sequence numbers and caps a connection's first frame, so feed it one
        // encoder's stream: a small first frame, then the payloads, from the start again.
        let mut encoder = Encoder::new(FrameKey::from_secret(b"bench"));
        let hello = encoder.encode(0, b"hello").expect("encode");
        let frames: Vec<Vec<u8>> = (0..64).map(|_| encoder.encode(1, &payload).expect("encode")).collect();
        let fresh_decoder = || {
            let mut decoder = Decoder::new(FrameKey::from_secret(b"bench"));
            decoder.push(&hello);
            decoder.next_frame().expect("decode").expect("the first frame");
            decoder
        };
        let mut decoder = fresh_decoder();
        let mut next = 0;
        let dec_sealed = throughput(size, budget, || {
            if next == frames.len() {
                decoder = fresh_decoder();
                next = 0;
            }
            decoder.push(&frames[next]);
            next += 1;
            black_box(decoder.next_frame().expect("decode").expect("a whole frame"));
        });
        assert_eq!(frames[0].len(), HEADER_BYTES + size + TRAILER_BYTES);
        println!(
            "{:>6} KiB | {enc_plain:>9.0} {enc_hmac:>9.0} {enc_sealed:>9.0} | {dec_plain:>9.0} {dec_hmac:>9.0} {dec_sealed:>9.0}",
            size >> 10
        );
    }
}
