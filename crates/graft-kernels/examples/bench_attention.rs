//! Times attention forward/backward on the SmolLM2-135M shape (4 × 512 tokens, 9 heads, 3 KV
//! heads, head_dim 64): `cargo run --release -p graft-kernels --example bench_attention`.

use graft_kernels::AttentionShape;
use graft_kernels::cpu::attention::{attention_backward, attention_forward};
use std::time::Instant;

fn main() {
    for bf16 in [false, true] {
        println!("bf16 products: {bf16}");
        run(bf16);
    }
}

fn run(bf16: bool) {
    let (segs, len) = (4, 512);
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        window: None,
        bf16,
    };
    let t = segs * len;
    let segments: Vec<(usize, usize)> = (0..segs).map(|s| (s * len, len)).collect();
    let r = |n: usize, k: u64| {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + k) % 1000) as f32 / 1000.0) - 0.5)
            .collect::<Vec<f32>>()
    };
    let (q, k, v) = (r(t * 576, 1), r(t * 192, 2), r(t * 192, 3));
    let dout = r(t * 576, 4);
    let mut out = vec![0.0; t * 576];
    let mut lse = vec![0.0; t * 9];
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * 576], vec![0.0; t * 192], vec![0.0; t * 192]);
    let flops_fwd = 4.0 * (len * len / 2) as f64 * 64.0 * 9.0 * segs as f64;
    for _ in 0..2 {
        let t0 = Instant::now();
        attention_forward(&mut out, &mut lse, &q, &k, &v, &segments, &shape);
        let f = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &segments, &shape,
        );
        let b = t0.elapsed().as_secs_f64();
        println!(
            "forward {:.1} ms ({:.0} GFLOP/s), backward {:.1} ms ({:.0} GFLOP/s)",
            f * 1e3,
            flops_fwd / f / 1e9,
            b * 1e3,
            2.5 * flops_fwd / b / 1e9
        );
    }
}
