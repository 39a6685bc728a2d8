//! The engine's one source of randomness: data order, dropout, sampling and random init.
//!
//! [`Rng`] is xoshiro256** seeded through splitmix64: fast, small, and its whole state is four
//! `u64`s ([`RngState`]) that go into a training checkpoint, so a resumed run draws exactly the
//! numbers an uninterrupted one would. It shuffles the data order (graft-train's epochs with
//! [`Rng::shuffle`]; graft-data's packing with [`Rng::shuffle_modulo`]) and drives a sampler's
//! stream (`graft_model::sample::Sampler`, seeded per request or per RL completion).
//!
//! [`uniform_at`] is counter-based: a hash of `(seed, stream, index)` mapped to `[0, 1)`. Dropout
//! masks use such hashes so backward can regenerate the forward mask from the same coordinates
//! instead of storing it, and so the mask does not depend on thread scheduling;
//! [`Backend::dropout`](crate::Backend::dropout) uses [`dropout_keep_at`], a one-coordinate hash.
//!
//! Random init draws from plain [`splitmix64`] streams ([`normal_stream`] for LoRA `A`
//! matrices; `graft_model::shapes::random_tensor` for whole random models).
//!
//! Every function here is part of a run's reproducible output: changing one changes data order,
//! checkpoints, sampled text or initial weights.

use serde::{Deserialize, Serialize};

/// The golden-ratio increment of splitmix64 (also used to spread seeds and indices).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One step of splitmix64: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    mix64(*state)
}

/// splitmix64's output function (Stafford's variant 13): a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform `f32` in `[0, 1)` that depends only on `(seed, stream, index)`.
///
/// `stream` separates independent uses (for example one stream per LoRA layer and micro-batch) and
/// `index` is the element's position. Calling it twice with the same arguments gives the same value,
/// so a dropout mask can be recomputed in backward. The result has 24 random bits, so every value is
/// exactly representable and `uniform_at(..) < p` has probability `p` up to 2⁻²⁴.
pub fn uniform_at(seed: u64, stream: u64, index: u64) -> f32 {
    let h = mix64(seed ^ mix64(stream.wrapping_add(GOLDEN_GAMMA) ^ mix64(index.wrapping_mul(GOLDEN_GAMMA))));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Whether element `index` survives dropout with drop probability `p` (see [`uniform_at`]).
pub fn dropout_keep(seed: u64, stream: u64, index: u64, p: f32) -> bool {
    uniform_at(seed, stream, index) >= p
}

/// The keep decision of [`Backend::dropout`](crate::Backend::dropout) for element `index`: one
/// splitmix64 mix of `seed ^ index·γ`, its top 24 bits as a uniform in `[0, 1)` compared with the
/// drop probability `p`. The caller folds layer and micro-batch into `seed`. (A different hash
/// from [`dropout_keep`]; kept so LoRA dropout masks, and the runs that use them, do not change.)
pub fn dropout_keep_at(seed: u64, index: u64, p: f32) -> bool {
    let z = mix64(seed ^ index.wrapping_mul(GOLDEN_GAMMA));
    ((z >> 40) as f32 / (1u64 << 24) as f32) >= p
}

/// `n` normal samples with standard deviation `std` from the splitmix64 stream of `seed`
/// (Box–Muller on two draws in `(0, 1)` per sample; the cosine branch). Initialises LoRA `A`.
pub fn normal_stream(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || ((splitmix64(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// The serialisable state of an [`Rng`]: the four xoshiro256** words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState(pub [u64; 4]);

/// xoshiro256**: a small, fast, deterministic generator with a 256-bit state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose state is four splitmix64 outputs of `seed` (the seeding its authors
    /// recommend; never produces the all-zero state).
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    /// An independent generator for `(seed, stream)`, e.g. one per epoch's shuffle.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        Rng::new(seed ^ mix64(stream.wrapping_add(GOLDEN_GAMMA).wrapping_mul(GOLDEN_GAMMA)))
    }

    /// Restores a generator from a saved state. An all-zero state (never produced by [`Rng::new`])
    /// would only output zeros, so it is replaced by the state of `Rng::new(0)`.
    pub fn from_state(state: RngState) -> Self {
        if state.0 == [0; 4] {
            Rng::new(0)
        } else {
            Rng { s: state.0 }
        }
    }

    /// The current state, to save in a checkpoint.
    pub fn state(&self) -> RngState {
        RngState(self.s)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform `f32` in `[0, 1)` (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform `f64` in `[0, 1)` (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n`, without modulo bias (Lemire's method with rejection).
    /// Returns 0 when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Shuffles `items` in place (Fisher–Yates); the permutation depends only on the state.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A uniform integer in `0..n` by rejection of the top partial range and `x % n` (returns 0
    /// when `n == 0`). Draws differ from [`Rng::below`]'s; graft-data's shuffles have always used
    /// this one, so it stays for their data order.
    pub fn below_modulo(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates like [`Rng::shuffle`], drawing with [`Rng::below_modulo`]: the order of
    /// graft-data's packed batches and `shuffled_indices`.
    pub fn shuffle_modulo<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below_modulo(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// The permutation `0..n` shuffled with [`Rng::shuffle`]: the order of one epoch.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        self.shuffle(&mut order);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The functions that joined this module from graft-data and graft-model, pinned to what
    /// their old copies produced (graft-data's shuffle, the backend's dropout hash).
    #[test]
    fn joined_copies_are_pinned() {
        let mut v: Vec<usize> = (0..20).collect();
        Rng::new(42).shuffle_modulo(&mut v);
        assert_eq!(
            v,
            vec![
                13, 3, 8, 7, 12, 1, 5, 6, 17, 14, 16, 18, 0, 19, 9, 4, 15, 11, 10, 2
            ]
        );
        let keep = (0..64u64).fold(0u64, |m, i| m | (dropout_keep_at(77, i, 0.3) as u64) << i);
        assert_eq!(keep, 17437435141182647514);
        assert_eq!(Rng::new(1).below_modulo(0), 0);
    }

    /// First outputs for fixed seeds, as they were before the RNG moved to `graft_kernels::rng`:
    /// shuffles (data order), checkpointed states and dropout coordinates must not change.
    #[test]
    fn outputs_are_pinned() {
        let mut a = Rng::new(42);
        let words: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(
            words,
            vec![
                1546998764402558742,
                6990951692964543102,
                12544586762248559009,
                17057574109182124193
            ]
        );
        assert_eq!(
            a.state(),
            RngState([
                7903954225905035531,
                9357853297271469720,
                2724644940759801119,
                10543582298886573110
            ])
        );
        let mut b = Rng::for_stream(42, 3);
        assert_eq!(
            [b.next_u64(), b.next_u64()],
            [5306432769281795871, 7379402099793603159]
        );
        let mut c = Rng::new(9);
        let small: Vec<u64> = (0..6).map(|_| c.below(1000)).collect();
        assert_eq!(small, vec![2, 251, 132, 732, 920, 744]);
        assert_eq!(
            (c.next_f32().to_bits(), c.next_f64().to_bits()),
            (1060032748, 4602714788394349476)
        );
        assert_eq!(
            Rng::new(5).permutation(12),
            vec![0, 2, 9, 1, 8, 11, 5, 4, 7, 10, 6, 3]
        );
        assert_eq!(
            Rng::for_stream(7, u64::MAX).permutation(12),
            vec![0, 1, 2, 9, 8, 11, 4, 7, 6, 5, 3, 10]
        );
        let u: Vec<u32> = (0..4).map(|i| uniform_at(1, 2, i).to_bits()).collect();
        assert_eq!(u, vec![1064469103, 1057089336, 1062650148, 1033000760]);
        let keep = (0..64u64).fold(0u64, |m, i| m | (dropout_keep(11, 3, i, 0.4) as u64) << i);
        assert_eq!(keep, 15659538588794962558);
    }

    #[test]
    fn xoshiro_matches_reference_sequence() {
        // Reference: the C implementation seeded with s = {1, 2, 3, 4}.
        let mut rng = Rng::from_state(RngState([1, 2, 3, 4]));
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn splitmix_matches_reference() {
        // Reference values of splitmix64 seeded with 1234567 (from the author's C code).
        let mut s = 1234567u64;
        assert_eq!(splitmix64(&mut s), 6457827717110365317);
        assert_eq!(splitmix64(&mut s), 3203168211198807973);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let mut a = Rng::new(42);
        for _ in 0..10 {
            a.next_u64();
        }
        let saved = serde_json::to_string(&a.state()).unwrap();
        let mut b = Rng::from_state(serde_json::from_str(&saved).unwrap());
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            let x = rng.below(6);
            counts[x as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn shuffle_is_a_permutation_and_deterministic() {
        let p1 = Rng::new(3).permutation(1000);
        let p2 = Rng::new(3).permutation(1000);
        assert_eq!(p1, p2);
        let mut sorted = p1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(p1, (0..1000).collect::<Vec<_>>());
        assert_ne!(p1, Rng::new(4).permutation(1000));
    }

    #[test]
    fn floats_are_in_unit_interval() {
        let mut rng = Rng::new(1);
        let mut sum = 0.0;
        for _ in 0..100_000 {
            let x = rng.next_f32();
            let y = rng.next_f64();
            assert!((0.0..1.0).contains(&x) && (0.0..1.0).contains(&y));
            sum += y;
        }
        assert!((sum / 100_000.0 - 0.5).abs() < 0.01);
    }

    #[test]
    fn uniform_at_is_deterministic_and_uniform() {
        assert_eq!(uniform_at(1, 2, 3), uniform_at(1, 2, 3));
        assert_ne!(uniform_at(1, 2, 3), uniform_at(1, 2, 4));
        assert_ne!(uniform_at(1, 2, 3), uniform_at(1, 3, 3));
        assert_ne!(uniform_at(1, 2, 3), uniform_at(2, 2, 3));
        let n = 100_000u64;
        let mut buckets = [0u32; 10];
        let mut sum = 0.0f64;
        for i in 0..n {
            let u = uniform_at(99, 5, i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
            sum += u as f64;
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.005);
        for b in buckets {
            assert!((9_500..10_500).contains(&b), "{buckets:?}");
        }
        // Neighbouring streams are not correlated element by element.
        let agree = (0..10_000u64)
            .filter(|&i| (uniform_at(1, 0, i) < 0.5) == (uniform_at(1, 1, i) < 0.5))
            .count();
        assert!((4_700..5_300).contains(&agree), "{agree}");
    }

    #[test]
    fn dropout_keep_rate_matches_p() {
        let kept = (0..100_000u64).filter(|&i| dropout_keep(11, 0, i, 0.1)).count();
        assert!((89_000..91_000).contains(&kept), "{kept}");
        assert!((0..1000u64).all(|i| dropout_keep(11, 0, i, 0.0)));
    }
}
