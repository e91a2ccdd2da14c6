//! The host side of the machine's doors: the terminal, TAP devices, entropy. Each
//! source runs on its own thread and sends [`HostEvent`]s to the driver, which stamps
//! them with the instruction count at which they enter the machine.

pub mod announce;
pub mod console;
pub mod tap;

/// Something from the outside world for the guest.
#[derive(Debug)]
pub enum HostEvent {
    Console(Vec<u8>),
    /// The user pressed Ctrl-A x.
    Quit,
    NetFrame(Vec<u8>),
    /// A request from the control API.
    Control(crate::control::ControlRequest),
    /// From the replication mode's own thread (see [`crate::mode::ModeEvent`]).
    Mode(crate::mode::ModeEvent),
}

/// Where the entropy the guest's RNG device receives comes from (logged as an input like
/// any other either way).
pub enum EntropySource {
    /// The host's own randomness.
    Host,
    /// A ChaCha20 generator seeded with `ftvm run --seed N`: two runs with the same seed
    /// and no outside input receive the same bytes, so they run alike.
    Seeded(Box<rand_chacha::ChaCha20Rng>),
}

impl EntropySource {
    pub fn seeded(seed: u64) -> EntropySource {
        use rand_chacha::rand_core::SeedableRng;
        EntropySource::Seeded(Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed)))
    }

    /// `len` bytes for the guest.
    pub fn draw(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        match self {
            EntropySource::Host => entropy(len),
            EntropySource::Seeded(rng) => {
                use rand_chacha::rand_core::RngCore;
                let mut buf = vec![0; len];
                rng.fill_bytes(&mut buf);
                Ok(buf)
            }
        }
    }
}

/// Host entropy for the guest's RNG device (logged as an input like any other).
///
/// getrandom(2) rather than /dev/urandom: it needs no file descriptor, so a process whose
/// descriptors ran out (a flood of connections) still gets its randomness.
pub fn entropy(len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    getrandom::fill(&mut buf).map_err(std::io::Error::other)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_source_draws_the_same_bytes_for_the_same_seed_only() {
        let draw = |seed| {
            let mut source = EntropySource::seeded(seed);
            [source.draw(64).unwrap(), source.draw(64).unwrap()]
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert_ne!(draw(7)[0], draw(7)[1]);
    }
}
