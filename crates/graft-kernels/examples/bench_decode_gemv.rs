//! Times single-row decode products (`t` = 1) over a model's worth of weights, so that they come
//! from memory as in decode: 64 matrices of 576 × 1536 (a down projection) per storage type. Prints ms per pass and
//! the weight bytes streamed per second, next to the kernel paths this CPU takes.
//!
//!     cargo run --release -p graft-kernels --example bench_decode_gemv
use graft_kernels::Precision;
use graft_kernels::cpu::matmul::{Weight, linear_forward};
use graft_kernels::quant::{QuantTensor, QuantType};
use std::time::Instant;

fn main() {
    let (rows, cols, count) = (576usize, 1536usize, 64usize);
    println!("{}", graft_kernels::cpu::kernel_paths());
    let x: Vec<f32> = (0..cols).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01).collect();
    let mut y = vec![0.0f32; rows];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut byte = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 56) as u8
    };
    let mut cases: Vec<(String, Vec<Weight>)> = Vec::new();
    let f: Vec<f32> = (0..rows * cols).map(|i| (i % 89) as f32 * 0.001).collect();
    cases.push((
        "bf16".into(),
        (0..count)
            .map(|_| Weight::bf16_from_f32(&f, rows, cols))
            .collect(),
    ));
    for ty in [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ] {
        let n = rows * cols / ty.block_size() * ty.block_bytes();
        let ws = (0..count)
            .map(|_| {
                let mut data: Vec<u8> = (0..n).map(|_| byte()).collect();
                // Finite f16 scales: clear the exponent's top bit of every byte pair's high byte.
                data.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3b);
                Weight::quantized(QuantTensor::new(ty, data, rows, cols))
            })
            .collect();
        cases.push((format!("{ty:?}"), ws));
    }
    for (name, ws) in &cases {
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let t0 = Instant::now();
            for w in ws {
                linear_forward(&mut y, &x, w, 1, false, Precision::Fast);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{name:>5}: {:.2} ms per pass of {:.1} MB, {:.1} GB/s",
            best * 1e3,
            bytes as f64 / 1e6,
            bytes as f64 / best / 1e9
        );
    }
}
