//! Benchmark of `gemm_bf16` against the `gemm` crate's f32 GEMM on the training step's shapes.
//!
//! `cargo run --release -p graft-kernels --example bench_gemm_bf16 [-- PASSES [FILTER]]`
//! prints GFLOP/s on 1 and 2 threads, each the best over `PASSES` (default 3) passes over the
//! table; `FILTER` keeps the shapes whose "name layout m n k" contains it. Sources are f32 (as the
//! training step's activations), rounded to bf16 while packing; the "B=bf16" column stores B as
//! bf16 (frozen bf16 weights, or bf16 activations for dW); "pk" rows pack B once in advance
//! (`PackedB`, not timed). `BENCH_ONLY_BF16=1` skips the f32 runs.

use graft_kernels::cpu::gemm_bf16::{
    MatData, MatRef, PackedB, gemm_bf16, gemm_bf16_packed, has_avx512_bf16, measure_peak_gflops,
};
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
    /// B packed once in advance ([`PackedB`], outside the timing) rather than on every call.
    packed: bool,
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
    let args: Vec<String> = std::env::args().collect();
    // Passes over the whole table; each number is the best over all passes (the machine is shared,
    // so single measurements fluctuate).
    let passes: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    // Optional filter: only shapes whose "name layout m n k" contains it.
    let filter = args.get(2).cloned().unwrap_or_default();
    let only_bf16 = std::env::var_os("BENCH_ONLY_BF16").is_some();
    println!(
        "avx512_bf16: {}; best of {passes} passes; GFLOP/s",
        has_avx512_bf16()
    );
    let cases = [
        Case {
            name: "fwd qkv/o  X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 2048,
            n: 576,
            k: 576,
        },
        Case {
            name: "fwd kv     X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 2048,
            n: 192,
            k: 576,
        },
        Case {
            name: "fwd up     X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 2048,
            n: 1536,
            k: 576,
        },
        Case {
            name: "fwd down   X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 2048,
            n: 576,
            k: 1536,
        },
        Case {
            name: "lm_head    X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 512,
            n: 49152,
            k: 576,
        },
        Case {
            name: "lm_head    X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 256,
            n: 49152,
            k: 576,
        },
        Case {
            name: "bwd dX     dY·W",
            packed: false,
            layout: Layout::Nn,
            m: 2048,
            n: 576,
            k: 576,
        },
        Case {
            name: "bwd dX up  dY·W",
            packed: false,
            layout: Layout::Nn,
            m: 2048,
            n: 576,
            k: 1536,
        },
        Case {
            name: "bwd dX dn  dY·W",
            packed: false,
            layout: Layout::Nn,
            m: 2048,
            n: 1536,
            k: 576,
        },
        Case {
            name: "lm_head dX dY·W",
            packed: false,
            layout: Layout::Nn,
            m: 512,
            n: 576,
            k: 49152,
        },
        Case {
            name: "bwd dW     dYᵀX",
            packed: false,
            layout: Layout::Tn,
            m: 576,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW kv  dYᵀX",
            packed: false,
            layout: Layout::Tn,
            m: 192,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW up  dYᵀX",
            packed: false,
            layout: Layout::Tn,
            m: 1536,
            n: 576,
            k: 2048,
        },
        Case {
            name: "bwd dW dn  dYᵀX",
            packed: false,
            layout: Layout::Tn,
            m: 576,
            n: 1536,
            k: 2048,
        },
        Case {
            name: "lm_head dW dYᵀX",
            packed: false,
            layout: Layout::Tn,
            m: 49152,
            n: 576,
            k: 512,
        },
        // The chunk graft's cross-entropy uses by default (8 Mi logits), B packed on every call
        // or once (a frozen head).
        Case {
            name: "lm_head    X·Wᵀ",
            packed: false,
            layout: Layout::Nt,
            m: 170,
            n: 49152,
            k: 576,
        },
        Case {
            name: "lm_head pk X·Wᵀ",
            packed: true,
            layout: Layout::Nt,
            m: 170,
            n: 49152,
            k: 576,
        },
        Case {
            name: "lm_head dX dY·W",
            packed: false,
            layout: Layout::Nn,
            m: 170,
            n: 576,
            k: 49152,
        },
        Case {
            name: "lm_head pk dY·W",
            packed: true,
            layout: Layout::Nn,
            m: 170,
            n: 576,
            k: 49152,
        },
        // A serving step: 16–64 rows (decoding sequences, prompt chunks) against weights
        // packed for inference.
        Case {
            name: "serve qkv pk",
            packed: true,
            layout: Layout::Nt,
            m: 16,
            n: 576,
            k: 576,
        },
        Case {
            name: "serve up pk",
            packed: true,
            layout: Layout::Nt,
            m: 16,
            n: 1536,
            k: 576,
        },
        Case {
            name: "serve dn pk",
            packed: true,
            layout: Layout::Nt,
            m: 16,
            n: 576,
            k: 1536,
        },
        Case {
            name: "serve hd pk",
            packed: true,
            layout: Layout::Nt,
            m: 16,
            n: 49152,
            k: 576,
        },
        Case {
            name: "serve up pk",
            packed: true,
            layout: Layout::Nt,
            m: 32,
            n: 1536,
            k: 576,
        },
        Case {
            name: "serve up pk",
            packed: true,
            layout: Layout::Nt,
            m: 64,
            n: 1536,
            k: 576,
        },
    ];
    let lay = |l: Layout| match l {
        Layout::Nt => "NT",
        Layout::Nn => "NN",
        Layout::Tn => "TN",
    };
    let cases: Vec<&Case> = cases
        .iter()
        .filter(|c| format!("{} {} {} {} {}", c.name, lay(c.layout), c.m, c.n, c.k).contains(&filter))
        .collect();
    // Columns: bf16 1t, bf16 2t, bf16 2t with B stored bf16, gemm f32 1t, gemm f32 2t.
    let mut best = vec![[0.0f64; 5]; cases.len()];
    for _ in 0..passes {
        for (case, best) in cases.iter().zip(best.iter_mut()) {
            let (m, n, k) = (case.m, case.n, case.k);
            let flops = 2.0 * (m * n * k) as f64;
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut c = vec![0.0f32; m * n];
            let gf = |t: f64| flops / t * 1e-9;
            let mut run_bf16 = |threads: usize, bw: bool| {
                let bdata = if bw { MatData::Bf16(&bh) } else { MatData::F32(&b) };
                let (va, vb) = views(case, MatData::F32(&a), bdata);
                if case.packed {
                    let pb = PackedB::new(vb, threads);
                    gf(best_time(3, 0.2, || {
                        gemm_bf16_packed(&mut c, n, va, &pb, 1.0, 0.0, threads)
                    }))
                } else {
                    gf(best_time(3, 0.2, || {
                        gemm_bf16(&mut c, n, va, vb, 1.0, 0.0, threads)
                    }))
                }
            };
            let mut r = [
                run_bf16(1, false),
                run_bf16(2, false),
                run_bf16(2, true),
                0.0,
                0.0,
            ];
            if !only_bf16 {
                r[3] = gf(best_time(3, 0.2, || gemm_f32(case, &mut c, &a, &b, 1)));
                r[4] = gf(best_time(3, 0.2, || gemm_f32(case, &mut c, &a, &b, 2)));
            }
            for (b, r) in best.iter_mut().zip(r) {
                *b = b.max(r);
            }
        }
    }
    println!(
        "{:<16} {:>3} {:>5} {:>6} {:>6} | {:>8} {:>8} {:>10} | {:>8} {:>8} | {:>5}",
        "shape", "lay", "m", "n", "k", "bf16 1t", "bf16 2t", "2t B=bf16", "f32 1t", "f32 2t", "x f32"
    );
    for (case, r) in cases.iter().zip(&best) {
        println!(
            "{:<16} {:>3} {:>5} {:>6} {:>6} | {:>8.1} {:>8.1} {:>10.1} | {:>8.1} {:>8.1} | {:>5.2}",
            case.name,
            lay(case.layout),
            case.m,
            case.n,
            case.k,
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[1] / r[4]
        );
    }
    if filter.is_empty() {
        for threads in [1, 2] {
            let (f, h) = measure_peak_gflops(threads);
            println!("measure_peak_gflops({threads}): f32 {f:.1}, bf16 {h:.1} GFLOP/s");
        }
    }
}
