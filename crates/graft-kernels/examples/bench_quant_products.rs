//! Times the products on a down projection's shape (576 × 1536) per storage type, next to the
//! kernel paths this CPU takes:
//!
//! * decode: single-row products over 64 such matrices, so that the weights come from memory as
//!   in decode; ms per pass and the weight bytes streamed per second;
//! * prompt: 512 rows on block-quantized weights both ways a CPU without a bf16 GEMM can run
//!   them — the decode products eight rows at a time (8-bit activations) and the f32 GEMM on
//!   dequantized panels (exact mode).
//!
//!     cargo run --release -p graft-kernels --example bench_quant_products
use graft_kernels::Precision;
use graft_kernels::cpu::matmul::{Weight, linear_forward};
use graft_kernels::cpu::quant_matmul::{forward, forward_in_decode_chunks};
use graft_kernels::quant::{QuantTensor, QuantType};
use std::time::Instant;

const ROWS: usize = 576;
const COLS: usize = 1536;
const TYPES: [QuantType; 6] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q5_0,
    QuantType::Q4_K,
    QuantType::Q6_K,
];

/// Random blocks of `ty` with finite f16 scales (each byte pair's high byte keeps the exponent
/// below its top bit); the values do not matter for timing.
fn random_tensor(ty: QuantType, seed: &mut u64) -> QuantTensor {
    let n = ROWS * COLS / ty.block_size() * ty.block_bytes();
    let mut data: Vec<u8> = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 56) as u8
        })
        .collect();
    data.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3b);
    QuantTensor::new(ty, data, ROWS, COLS)
}

/// Single-row products over 64 matrices per storage type.
fn decode(seed: &mut u64) {
    let count = 64;
    let x: Vec<f32> = (0..COLS).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01).collect();
    let mut y = vec![0.0f32; ROWS];
    let f: Vec<f32> = (0..ROWS * COLS).map(|i| (i % 89) as f32 * 0.001).collect();
    let mut cases: Vec<(String, Vec<Weight>)> = vec![(
        "bf16".into(),
        (0..count)
            .map(|_| Weight::bf16_from_f32(&f, ROWS, COLS))
            .collect(),
    )];
    for ty in TYPES {
        let ws = (0..count)
            .map(|_| Weight::quantized(random_tensor(ty, seed)))
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
            "decode {name:>5}: {:.2} ms per pass of {:.1} MB, {:.1} GB/s",
            best * 1e3,
            bytes as f64 / 1e6,
            bytes as f64 / best / 1e9
        );
    }
}

/// A 512-row product per block type, in decode chunks and through the exact f32 GEMM.
fn prompt(seed: &mut u64) {
    let t = 512;
    let x: Vec<f32> = (0..t * COLS)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01)
        .collect();
    let mut y = vec![0.0f32; t * ROWS];
    let gflop = 2.0 * (t * ROWS * COLS) as f64 / 1e9;
    for ty in TYPES {
        let w = random_tensor(ty, seed);
        let (mut chunks, mut exact) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let t0 = Instant::now();
            forward_in_decode_chunks(&mut y, &x, &w, t);
            chunks = chunks.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            forward(&mut y, &x, &w, t, false, Precision::Exact);
            exact = exact.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "prompt {:>5}: decode chunks {:.2} ms ({:.0} GFLOP/s) | exact f32 {:.2} ms ({:.0} GFLOP/s)",
            format!("{ty:?}"),
            chunks * 1e3,
            gflop / chunks,
            exact * 1e3,
            gflop / exact
        );
    }
}

fn main() {
    println!("{}", graft_kernels::cpu::kernel_paths());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    decode(&mut seed);
    prompt(&mut seed);
}
