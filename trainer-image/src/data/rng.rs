//! A tiny deterministic PRNG (splitmix64) and Fisher–Yates shuffle. Everything random in the data
//! pipeline (eval split, epoch shuffles, packing order) goes through here, never through tch's
//! global generator, so a run is a pure function of its seed and a restored cursor replays exactly.

/// splitmix64 (Steele, Lea, Flood 2014): a 64-bit state advanced by the golden gamma.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one named stream of `seed` (e.g. the shuffle of `epoch`); streams with
    /// different `(stream, index)` are decorrelated by hashing, not by offsetting the state.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut g = SplitMix64(seed ^ mix(stream.wrapping_mul(0xD6E8_FEB8_6659_FD93)));
        let a = g.next_u64();
        SplitMix64(a ^ mix(index.wrapping_add(0x9E37_79B9_7F4A_7C15)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`) by rejection, so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates (Durstenfeld) shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// splitmix64's output function (a good 64-bit finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream ids for [`SplitMix64::derive`].
pub mod stream {
    pub const EVAL_SPLIT: u64 = 1;
    pub const PACKING: u64 = 2;
    pub const EPOCH: u64 = 3;
    pub const BATCH_ORDER: u64 = 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of splitmix64 seeded with 0 (reference implementation by Vigna).
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::derive(7, stream::EPOCH, 3).shuffle(&mut a);
        SplitMix64::derive(7, stream::EPOCH, 3).shuffle(&mut b);
        assert_eq!(a, b);
        let mut c: Vec<u32> = (0..100).collect();
        SplitMix64::derive(7, stream::EPOCH, 4).shuffle(&mut c);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
