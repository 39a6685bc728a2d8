//! Times a 512-row prompt product on block-quantized weights (576 × 1536, a down projection) both
//! ways a CPU without a bf16 GEMM can run it: the decode products in chunks of eight rows
//! (8-bit activations) and the f32 GEMM on dequantized panels (exact mode).
//!
//!     cargo run --release -p graft-kernels --example bench_prompt_quant
use graft_kernels::Precision;
use graft_kernels::cpu::quant_matmul::{forward, forward_in_decode_chunks};
use graft_kernels::quant::{QuantTensor, QuantType};
use std::time::Instant;

fn main() {
    let (rows, cols, t) = (576usize, 1536usize, 512usize);
    println!("{}", graft_kernels::cpu::kernel_paths());
    let x: Vec<f32> = (0..t * cols)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01)
        .collect();
    let mut y = vec![0.0f32; t * rows];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for ty in [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ] {
        let n = rows * cols / ty.block_size() * ty.block_bytes();
        let mut data: Vec<u8> = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        data.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3b);
        let w = QuantTensor::new(ty, data, rows, cols);
        let (mut chunks, mut exact) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let t0 = Instant::now();
            forward_in_decode_chunks(&mut y, &x, &w, t);
            chunks = chunks.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            forward(&mut y, &x, &w, t, false, Precision::Exact);
            exact = exact.min(t0.elapsed().as_secs_f64());
        }
        let gflop = 2.0 * (t * rows * cols) as f64 / 1e9;
        println!(
            "{:>5}: decode chunks {:.2} ms ({:.0} GFLOP/s) | exact f32 {:.2} ms ({:.0} GFLOP/s)",
            format!("{ty:?}"),
            chunks * 1e3,
            gflop / chunks,
            exact * 1e3,
            gflop / exact
        );
    }
}
