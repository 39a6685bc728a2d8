//! Packing tokenized samples into padding-free batches for isolated (block-diagonal) attention,
//! and their seeded shuffles (the engine's one RNG, `graft_kernels::rng`) for a reproducible order
//! on every platform.

use crate::error::{Error, Result};
use crate::sample::TokenizedSample;
use graft_kernels::rng::Rng;

/// Ignored target value (no loss at this position).
pub use graft_kernels::IGNORE_INDEX;

/// Several sequences concatenated into one row of `budget` tokens or fewer, with no padding.
///
/// The engine attends from token `t` to token `u` only when `seq_ids[t] == seq_ids[u]` and
/// `u <= t`; positions restart at 0 for each sequence; the loss is the mean over targets that are
/// not [`IGNORE_INDEX`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedBatch {
    /// Concatenated token ids.
    pub input_ids: Vec<u32>,
    /// Position of each token inside its own sequence.
    pub positions: Vec<u32>,
    /// Which packed sequence each token belongs to (0, 1, 2, … in order).
    pub seq_ids: Vec<u32>,
    /// `targets[t]` = id of token `t+1` of the same sequence when that token is trained, else -100.
    pub targets: Vec<i32>,
}

impl PackedBatch {
    /// Concatenates samples.
    pub fn from_samples(samples: &[&TokenizedSample]) -> Self {
        let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
        let mut b = PackedBatch {
            input_ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            seq_ids: Vec::with_capacity(total),
            targets: Vec::with_capacity(total),
        };
        for (k, s) in samples.iter().enumerate() {
            b.input_ids.extend_from_slice(&s.input_ids);
            b.positions.extend(0..s.input_ids.len() as u32);
            b.seq_ids.extend(std::iter::repeat_n(k as u32, s.input_ids.len()));
            b.targets.extend(s.targets());
        }
        b
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the batch holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions that contribute to the loss.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Number of packed sequences.
    pub fn sequence_count(&self) -> usize {
        self.seq_ids.last().map(|&s| s as usize + 1).unwrap_or(0)
    }
}

/// Best-fit decreasing bin packing: items longest first, each into the open bin it fills most
/// tightly, a new bin when none fits. Returns bins of item indices (ties broken by index, so the
/// result is deterministic). Errors when an item exceeds the budget.
pub fn best_fit_decreasing(lengths: &[usize], budget: usize) -> Result<Vec<Vec<usize>>> {
    if budget == 0 {
        return Err(Error::invalid("packing", "token budget must be at least 1"));
    }
    if let Some((i, &len)) = lengths.iter().enumerate().find(|(_, l)| **l > budget) {
        return Err(Error::invalid(
            "packing",
            format!(
                "sample {i} has {len} tokens, more than the budget of {budget}; truncate to max length first"
            ),
        ));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (remaining capacity, bin index) ordered, so the tightest fit is the first entry >= len.
    let mut open: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in order {
        let len = lengths[i];
        let fit = open.range((len, 0)..).next().copied();
        match fit {
            Some((remaining, bin)) => {
                open.remove(&(remaining, bin));
                bins[bin].push(i);
                if remaining - len > 0 {
                    open.insert((remaining - len, bin));
                }
            }
            None => {
                bins.push(vec![i]);
                if budget - len > 0 {
                    open.insert((budget - len, bins.len() - 1));
                }
            }
        }
    }
    Ok(bins)
}

/// Counts from a packing run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Samples packed.
    pub samples: usize,
    /// Samples skipped because they have no trained target.
    pub skipped_untrained: usize,
    /// Batches produced.
    pub batches: usize,
    /// Tokens in all batches.
    pub tokens: usize,
    /// Budget × batches: fill = tokens / capacity.
    pub capacity: usize,
}

/// Packs samples into batches of at most `budget` tokens, in an order shuffled by `seed` and
/// `epoch` (the same inputs give the same batches on every platform). Samples without any trained
/// target are skipped and counted.
pub fn pack(
    samples: &[TokenizedSample],
    budget: usize,
    seed: u64,
    epoch: u64,
) -> Result<(Vec<PackedBatch>, PackStats)> {
    let useful: Vec<usize> = (0..samples.len())
        .filter(|&i| samples[i].trained_count() > 0)
        .collect();
    let lengths: Vec<usize> = useful.iter().map(|&i| samples[i].input_ids.len()).collect();
    let mut bins = best_fit_decreasing(&lengths, budget)?;
    let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.shuffle_modulo(&mut bins);
    let mut stats = PackStats {
        samples: useful.len(),
        skipped_untrained: samples.len() - useful.len(),
        batches: bins.len(),
        ..Default::default()
    };
    let batches: Vec<PackedBatch> = bins
        .iter()
        .map(|bin| {
            let refs: Vec<&TokenizedSample> = bin.iter().map(|&k| &samples[useful[k]]).collect();
            PackedBatch::from_samples(&refs)
        })
        .collect();
    stats.tokens = batches.iter().map(|b| b.len()).sum();
    stats.capacity = budget * batches.len();
    Ok((batches, stats))
}

/// `0..n` in an order shuffled by `seed` (for epochs over unpacked samples, e.g. preference pairs).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle_modulo(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shuffles as they were before the RNG moved to `graft_kernels::rng`: data order must not
    /// change (a run's batches, and resume, depend on it).
    #[test]
    fn shuffle_order_is_pinned() {
        assert_eq!(
            shuffled_indices(20, 42),
            vec![
                13, 3, 8, 7, 12, 1, 5, 6, 17, 14, 16, 18, 0, 19, 9, 4, 15, 11, 10, 2
            ]
        );
        let big = shuffled_indices(1000, 7);
        let digest = big.iter().enumerate().fold(0u64, |h, (i, &j)| {
            h.wrapping_mul(31).wrapping_add((i * 1000 + j) as u64)
        });
        assert_eq!(digest, 12393718421497631546);
    }

    fn sample(ids: &[u32], trained: &[bool]) -> TokenizedSample {
        TokenizedSample {
            input_ids: ids.to_vec(),
            trained: trained.to_vec(),
            original_len: ids.len(),
            notes: Default::default(),
        }
    }

    #[test]
    fn best_fit_decreasing_is_tight_and_complete() {
        let lengths = [5, 4, 3, 3, 2, 2, 1];
        let bins = best_fit_decreasing(&lengths, 10).unwrap();
        let mut all: Vec<usize> = bins.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 10);
        }
        assert_eq!(bins.len(), 2);
        assert!(best_fit_decreasing(&[11], 10).is_err());
    }

    #[test]
    fn packed_batch_restarts_positions_and_isolates_targets() {
        let a = sample(&[1, 10, 11, 2], &[false, false, true, true]);
        let b = sample(&[1, 20, 21], &[false, true, true]);
        let batch = PackedBatch::from_samples(&[&a, &b]);
        assert_eq!(batch.input_ids, vec![1, 10, 11, 2, 1, 20, 21]);
        assert_eq!(batch.positions, vec![0, 1, 2, 3, 0, 1, 2]);
        assert_eq!(batch.seq_ids, vec![0, 0, 0, 0, 1, 1, 1]);
        // Last token of a sequence never predicts the next sequence's first token.
        assert_eq!(batch.targets, vec![-100, 11, 2, -100, 20, 21, -100]);
        assert_eq!(batch.target_count(), 4);
        assert_eq!(batch.sequence_count(), 2);
    }

    #[test]
    fn pack_is_deterministic_and_respects_budget() {
        let samples: Vec<TokenizedSample> = (1..40u32)
            .map(|n| {
                let len = (n % 13 + 2) as usize;
                sample(&vec![n; len], &vec![true; len])
            })
            .chain([sample(&[1, 2], &[false, false])])
            .collect();
        let (a, stats) = pack(&samples, 32, 7, 0).unwrap();
        let (b, _) = pack(&samples, 32, 7, 0).unwrap();
        let (c, _) = pack(&samples, 32, 7, 1).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(stats.skipped_untrained, 1);
        assert_eq!(stats.samples, 39);
        let total: usize = samples[..39].iter().map(|s| s.input_ids.len()).sum();
        assert_eq!(stats.tokens, total);
        for batch in &a {
            assert!(batch.len() <= 32);
            for t in 0..batch.len() {
                if batch.targets[t] != IGNORE_INDEX {
                    assert_eq!(batch.seq_ids[t], batch.seq_ids[t + 1]);
                    assert_eq!(batch.targets[t], batch.input_ids[t + 1] as i32);
                }
                if t > 0 && batch.seq_ids[t] != batch.seq_ids[t - 1] {
                    assert_eq!(batch.positions[t], 0);
                }
            }
        }
    }

    #[test]
    fn rng_is_reproducible_and_uniform_enough() {
        let mut r = Rng::new(42);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r2 = Rng::new(42);
        assert_eq!(first, (0..3).map(|_| r2.next_u64()).collect::<Vec<_>>());
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
        let mut v: Vec<u32> = (0..10).collect();
        Rng::new(1).shuffle(&mut v);
        let mut w: Vec<u32> = (0..10).collect();
        Rng::new(1).shuffle(&mut w);
        assert_eq!(v, w);
        assert_ne!(v, (0..10).collect::<Vec<_>>());
        let idx = shuffled_indices(100, 9);
        let mut sorted = idx.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(idx, shuffled_indices(100, 9));
        // Pinned output: the generator must not change across platforms or versions.
        assert_eq!(Rng::new(0).next_u64(), 0x99ec5f36cb75f2b4);
    }
}
