//! The one random number generator of logitcache, and the functions built on it that decide
//! which sequences are held out, the data order and the students' initial weights.
//!
//! **This is part of the cache and run format.** A cache's held-out split ([`is_eval`]), a
//! training run's data order ([`permutation`], [`mix`]) and its resume cursor, and a
//! student's initial weights all follow from these exact bit patterns: changing any of them
//! moves every eval split and makes existing checkpoints resume on other data. The golden
//! tests below pin exact outputs for fixed seeds; a change that makes them fail is a format
//! change and needs a new format version, not a new expected value.
//!
//! ```
//! use logitcache::rng::{SplitMix, is_eval, permutation};
//! let mut r = SplitMix::new(0);
//! assert_eq!(r.next_u64(), SplitMix::new(0).next_u64());
//! let p = permutation(5, 42);
//! let mut sorted = p.clone();
//! sorted.sort();
//! assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
//! assert!(!is_eval(7, 0.0) && is_eval(7, 1.0));
//! ```

/// SplitMix64 (Steele, Lea and Flood 2014, the seeding generator of `java.util.SplittableRandom`)
/// with the seed xor-ed with the golden-ratio increment. Small, fast, and good enough for
/// shuffles, hashes and reproducible weights; not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// Whether `seq_id` is held out for evaluation at `fraction` (a hash, so stable across
/// caches of the same corpus and independent of order).
pub fn is_eval(seq_id: u64, fraction: f64) -> bool {
    let mut h = SplitMix::new(seq_id ^ 0x5eed_e7a1);
    ((h.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// A seeded Fisher-Yates permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// One seed from three numbers (seed, epoch, group, ...), for per-unit permutations.
pub fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut r = SplitMix::new(a ^ b.rotate_left(21) ^ c.rotate_left(42));
    r.next_u64()
}

#[cfg(test)]
mod tests {
    //! Golden values: printed by the generator and functions as they stood before this
    //! module existed (`onnx/toy.rs` SplitMix, `cache/stream.rs` is_eval/permutation/mix at
    //! commit ed6c563, compiled alone with rustc), i.e. what every cache and run so far was
    //! made with. They must never change; see the module doc.
    use super::*;

    #[test]
    fn splitmix_stream_is_pinned() {
        let mut r = SplitMix::new(0);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, GOLDEN_SPLITMIX_0);
        let mut r = SplitMix::new(12345);
        assert_eq!(r.next_u64(), GOLDEN_SPLITMIX_12345);
        let mut r = SplitMix::new(1);
        assert_eq!(r.next_f32().to_bits(), GOLDEN_F32_1);
    }

    #[test]
    fn eval_split_is_pinned() {
        // Which of seq_id 0..64 are held out at 2% (the trainer's default) and at 25%.
        let at = |f: f64| -> Vec<u64> { (0..64).filter(|&s| is_eval(s, f)).collect() };
        assert_eq!(at(0.02), GOLDEN_EVAL_2PCT);
        assert_eq!(at(0.25), GOLDEN_EVAL_25PCT);
        // Count over a larger range (a moved hash would move this too).
        assert_eq!(
            (0..100_000).filter(|&s| is_eval(s, 0.05)).count(),
            GOLDEN_EVAL_5PCT_COUNT
        );
    }

    #[test]
    fn permutation_and_mix_are_pinned() {
        assert_eq!(permutation(10, 0), GOLDEN_PERM_10_0);
        assert_eq!(permutation(10, 42), GOLDEN_PERM_10_42);
        assert_eq!(mix(0, 1, 0x0a11), GOLDEN_MIX);
    }

    const GOLDEN_SPLITMIX_0: [u64; 4] = [
        7960286522194355700,
        487617019471545679,
        17909611376780542444,
        1961750202426094747,
    ];
    const GOLDEN_SPLITMIX_12345: u64 = 12929068707531143761;
    const GOLDEN_F32_1: u32 = 1062420464;
    const GOLDEN_EVAL_2PCT: &[u64] = &[40];
    const GOLDEN_EVAL_25PCT: &[u64] =
        &[3, 6, 7, 12, 13, 15, 21, 29, 32, 40, 45, 52, 53, 55, 56, 58];
    const GOLDEN_EVAL_5PCT_COUNT: usize = 4910;
    const GOLDEN_PERM_10_0: &[usize] = &[8, 7, 6, 5, 3, 9, 2, 4, 1, 0];
    const GOLDEN_PERM_10_42: &[usize] = &[2, 3, 9, 7, 5, 8, 6, 4, 0, 1];
    const GOLDEN_MIX: u64 = 10616330186752741384;
}
