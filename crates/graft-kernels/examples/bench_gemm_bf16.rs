//! Benchmark of `gemm_bf16` against the `gemm` crate's f32 GEMM on the training step's shapes.
//!
//! `cargo run --release -p graft-kernels --example bench_gemm_bf16 [-- REPS]`
//! prints GFLOP/s (best of the repetitions) on 1 and 2 threads.

use graft_kernels::cpu::gemm_bf16::{MatData, MatRef, gemm_bf16, has_avx512_bf16, measure_peak_gflops};
use half::bf16;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Y = X · Wᵀ
    Nt,
    /// dX = dY · W
    Nn,
    /// dW = dYᵀ · X
    Tn,
}

struct Case {
    name: &'static str,
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
}

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// Best wall time of `f` over at least `reps` runs and ~`min_s` seconds, after one warm-up.
fn best_time(reps: usize, min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut i = 0;
    while i < reps || start.elapsed().as_secs_f64() < min_s {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        i += 1;
    }
    best
}

/// Views of A (m×k) and B (k×n) in the case's layout over storage `a`, `b`.
fn views<'a>(case: &Case, a: MatData<'a>, b: MatData<'a>) -> (MatRef<'a>, MatRef<'a>) {
    let (m, n, k) = (case.m, case.n, case.k);
    let va = match case.layout {
        // A stored m×k row-major.
        Layout::Nt | Layout::Nn => MatRef {
            data: a,
            rows: m,
            cols: k,
            row_stride: k,
            col_stride: 1,
        },
        // A = Gᵀ, G stored k×m row-major.
        Layout::Tn => MatRef {
            data: a,
            rows: m,
            cols: k,
            row_stride: 1,
            col_stride: m,
        },
    };
    let vb = match case.layout {
        // B = Wᵀ, W stored n×k row-major.
        Layout::Nt => MatRef {
            data: b,
            rows: k,
            cols: n,
            row_stride: 1,
            col_stride: k,
        },
        // B stored k×n row-major.
        Layout::Nn | Layout::Tn => MatRef {
            data: b,
            rows: k,
            cols: n,
            row_stride: n,
            col_stride: 1,
        },
    };
    (va, vb)
}

fn gemm_f32(case: &Case, c: &mut [f32], a: &[f32], b: &[f32], threads: usize) {
    let (m, n, k) = (case.m, case.n, case.k);
    let (va, vb) = views(case, MatData::F32(a), MatData::F32(b));
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the views lie inside `a` and `b` (same shapes as for gemm_bf16, which checks them);
    // `c` is m×n row-major; dst is not read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            va.col_stride as isize,
            va.row_stride as isize,
            b.as_ptr(),
            vb.col_stride as isize,
            vb.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    // Optional filter: only shapes whose "name layout m n k" contains it.
    let filter = std::env::args().nth(2).unwrap_or_default();
    let only_bf16 = std::env::var_os("BENCH_ONLY_BF16").is_some();
    println!("avx512_bf16: {}", has_avx512_bf16());
    let cases = [
        Case {
            name: "fwd qkv/o  X·Wᵀ",
            layout: Layout::Nt,
            m: 2048,
            n: 576,
            k: 576,
        },
        Case {
            name: "fwd kv     X·Wᵀ",
            layout: Layout::Nt,
            m: 2048,
            n: 192,
            k: 576,
        },
        Case {
            name: "fwd up     X·Wᵀ",
            layout: Layout::Nt,
            m: 2048,
            n: 1536,
            k: 576,
        },
        Case {
            name: "fwd down   X·Wᵀ",
            layout: Layout::Nt,
            m: 2048,
            n: 576,
            k: 1536,
        },
        Case {
            name: "lm_head    X·Wᵀ",
            layout: Layout::Nt,
            m: 512,
            n: 49152,
            k: 576,
        },
        Case {
            name: "lm_head    X·Wᵀ",
            layout: Layout::Nt,
            m: 256,
            n: 49152,
            k: 576,
        },
        Case {
            name: "bwd dX     dY·W",
            layout: Layout::Nn,
            m: 2048,
            n: 576,
            k: 576,
        },
        Case {
            name: "bwd dX up  dY·W",
            layout: Layout::Nn,
            m: 2048,
            n: 576,
            k: 1536,
        },
        Case {
            name: "bwd dX dn  dY·W",
            layout: Layout::Nn,
            m: 2048,
            n: 1536,
            k: 576,
        },
        Case {
            name: "lm_head dX dY·W",
            layout: Layout::Nn,
            m: 512,
            n: 576,
            k: 49152,
        },
        Case {
            name: "bwd dW     dYᵀX",
            layout: Layout::Tn,
            m: 576,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW kv  dYᵀX",
            layout: Layout::Tn,
            m: 192,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW up  dYᵀX",
            layout: Layout::Tn,
            m: 1536,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW dn  dYᵀX",
            layout: Layout::Tn,
            m: 576,
            n: 1536,
            k: 2048,
        },
    ];
    println!(
        "{:<16} {:>3} {:>5} {:>6} {:>6} | {:>9} {:>9} {:>9} | {:>8} {:>8}",
        "shape", "lay", "m", "n", "k", "bf16 1t", "bf16 2t", "bf16w 2t", "f32 1t", "f32 2t"
    );
    for case in &cases {
        let (m, n, k) = (case.m, case.n, case.k);
        let lay = match case.layout {
            Layout::Nt => "NT",
            Layout::Nn => "NN",
            Layout::Tn => "TN",
        };
        if !format!("{} {lay} {m} {n} {k}", case.name).contains(&filter) {
            continue;
        }
        let flops = 2.0 * (m * n * k) as f64;
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut c = vec![0.0f32; m * n];
        let gf = |t: f64| flops / t * 1e-9;
        let mut run_bf16 = |threads: usize, bw: bool| {
            let bdata = if bw { MatData::Bf16(&bh) } else { MatData::F32(&b) };
            let (va, vb) = views(case, MatData::F32(&a), bdata);
            gf(best_time(reps, 0.3, || {
                gemm_bf16(&mut c, n, va, vb, 1.0, 0.0, threads)
            }))
        };
        let (b1, b2, bw2) = (run_bf16(1, false), run_bf16(2, false), run_bf16(2, true));
        let (f1, f2) = if only_bf16 {
            (0.0, 0.0)
        } else {
            (
                gf(best_time(reps, 0.3, || gemm_f32(case, &mut c, &a, &b, 1))),
                gf(best_time(reps, 0.3, || gemm_f32(case, &mut c, &a, &b, 2))),
            )
        };
        println!(
            "{:<16} {:>3} {:>5} {:>6} {:>6} | {:>9.1} {:>9.1} {:>9.1} | {:>8.1} {:>8.1}",
            case.name, lay, m, n, k, b1, b2, bw2, f1, f2
        );
    }
    for threads in [1, 2] {
        if !filter.is_empty() {
            break;
        }
        let (f, h) = measure_peak_gflops(threads);
        println!("measure_peak_gflops({threads}): f32 {f:.1}, bf16 {h:.1} GFLOP/s");
    }
}
