//! Rotary position embeddings in Hugging Face's rotate-half layout: within each head the first
//! half of the dimensions pairs with the second half (`x[i]` with `x[i + d/2]`).

use rayon::prelude::*;

/// Precomputed `cos`/`sin` per (position, frequency) for one head width.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// Head width.
    pub head_dim: usize,
    /// Number of positions covered.
    pub max_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table from inverse frequencies (`head_dim / 2` of them) as transformers does:
    /// the angle `position · inv_freq` is formed in f32, then its cosine and sine.
    pub fn new(inv_freq: &[f32], max_positions: usize) -> RopeTable {
        let half = inv_freq.len();
        let mut cos = vec![0.0f32; max_positions * half];
        let mut sin = vec![0.0f32; max_positions * half];
        for p in 0..max_positions {
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = p as f32 * f;
                cos[p * half + i] = angle.cos();
                sin[p * half + i] = angle.sin();
            }
        }
        RopeTable {
            head_dim: 2 * half,
            max_positions,
            cos,
            sin,
        }
    }

    fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        assert!(
            pos < self.max_positions,
            "position {pos} beyond the RoPE table ({})",
            self.max_positions
        );
        (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        )
    }
}

/// Rotates every head of every row in place: `x` is `[rows, n_heads, head_dim]`.
pub fn rope_forward(x: &mut [f32], positions: &[u32], n_heads: usize, table: &RopeTable) {
    rotate(x, positions, n_heads, table, 1.0);
}

/// Backward of [`rope_forward`] in place (rotation by the negative angle).
pub fn rope_backward(dx: &mut [f32], positions: &[u32], n_heads: usize, table: &RopeTable) {
    rotate(dx, positions, n_heads, table, -1.0);
}

fn rotate(x: &mut [f32], positions: &[u32], n_heads: usize, table: &RopeTable, sign: f32) {
    let d = table.head_dim;
    let half = d / 2;
    let width = n_heads * d;
    assert_eq!(x.len(), positions.len() * width);
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let (cos, sin) = table.row(p as usize);
            for head in row.chunks_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    let s = sign * sin[i];
                    a[i] = x1 * cos[i] - x2 * s;
                    b[i] = x2 * cos[i] + x1 * s;
                }
            }
        });
}
