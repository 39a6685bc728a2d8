//! Times the base projection and its LoRA side products for a 2048 × 576 → 1536 layer.
use graft_kernels::Precision;
use graft_kernels::cpu::matmul::{Weight, linear_backward_input, linear_backward_weight, linear_forward};
use std::time::Instant;

fn main() {
    let (t, inp, out, r) = (2048, 576, 1536, 16);
    let x: Vec<f32> = (0..t * inp).map(|i| (i % 97) as f32 * 0.01).collect();
    let w = Weight::bf16_from_f32(
        &(0..out * inp)
            .map(|i| (i % 89) as f32 * 0.001)
            .collect::<Vec<_>>(),
        out,
        inp,
    );
    let a = Weight::f32((0..r * inp).map(|i| (i % 7) as f32 * 0.01).collect(), r, inp);
    let b = Weight::f32((0..out * r).map(|i| (i % 5) as f32 * 0.01).collect(), out, r);
    let mut y = vec![0.0; t * out];
    let mut xa = vec![0.0; t * r];
    let mut dx = vec![0.0; t * inp];
    let mut da = vec![0.0; r * inp];
    let mut db = vec![0.0; out * r];
    // What a K-concatenated fused product would cost: [x | xa]·[W | B]ᵀ and [dy | dxa]·[W ; A].
    let x2: Vec<f32> = (0..t * (inp + r)).map(|i| (i % 97) as f32 * 0.01).collect();
    let w2 = Weight::bf16_from_f32(&vec![0.001; out * (inp + r)], out, inp + r);
    let dy2: Vec<f32> = (0..t * (out + r)).map(|i| (i % 97) as f32 * 0.01).collect();
    let w3 = Weight::bf16_from_f32(&vec![0.001; (out + r) * inp], out + r, inp);
    let mut wp = w.clone();
    wp.pack_for_inference();
    for _ in 0..3 {
        let t0 = Instant::now();
        linear_forward(&mut y, &x, &wp, t, false, Precision::Fast);
        let f = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        linear_forward(&mut y, &x, &w, t, false, Precision::Fast);
        let g = t0.elapsed().as_secs_f64();
        println!(
            "base fwd prepacked {:.2} ms | packed per call {:.2} ms",
            f * 1e3,
            g * 1e3
        );
    }
    for _ in 0..3 {
        let t0 = Instant::now();
        linear_forward(&mut y, &x2, &w2, t, false, Precision::Fast);
        let f = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        linear_backward_input(&mut dx, &dy2, &w3, t, false, Precision::Fast);
        let b = t0.elapsed().as_secs_f64();
        println!("fused (K + r) fwd {:.2} ms | dX {:.2} ms", f * 1e3, b * 1e3);
    }
    for p in [Precision::Exact, Precision::Fast] {
        for _ in 0..2 {
            let t0 = Instant::now();
            linear_forward(&mut y, &x, &w, t, false, Precision::Fast);
            let base = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            linear_forward(&mut xa, &x, &a, t, false, p);
            let xa_t = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            linear_forward(&mut y, &xa, &b, t, true, p);
            let yb = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            linear_backward_input(&mut dx, &y, &w, t, false, Precision::Fast);
            let dxb = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            linear_backward_input(&mut xa, &y, &b, t, false, p);
            linear_backward_input(&mut dx, &xa, &a, t, true, p);
            let dxl = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            linear_backward_weight(&mut db, &y, &xa, t, out, r, true, p);
            linear_backward_weight(&mut da, &xa, &x, t, r, inp, true, p);
            let dw = t0.elapsed().as_secs_f64();
            println!(
                "{p:?}: base fwd {:.2} ms | lora x·Aᵀ {:.2} ms, +xa·Bᵀ {:.2} ms | base dX {:.2} ms | lora dX {:.2} ms | lora dA,dB {:.2} ms",
                base * 1e3,
                xa_t * 1e3,
                yb * 1e3,
                dxb * 1e3,
                dxl * 1e3,
                dw * 1e3
            );
        }
    }
}
