//! CPU implementations of the engine's ops, each a forward/backward pair over plain buffers.

pub mod alloc;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod gemm_bf16;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant_dot;
pub mod quant_matmul;
pub mod quant_packed;
pub mod rope;
pub mod skinny;

/// The kernel paths this CPU runs, in words, for benchmark headers: which bf16 product and which
/// quantized decode product were chosen at run time.
pub fn kernel_paths() -> String {
    let bf16 = format!("bf16 GEMM: {}", gemm_bf16::gemm_path().describe());
    let quant = match (quant_dot::int8_path(), quant_matmul::has_avx512_blocks()) {
        (Some(quant_dot::Int8Path::Vnni), _) => {
            "quantized decode: int8 activations, AVX-512 VNNI dot products (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; f32 block products for the rest)"
        }
        (Some(quant_dot::Int8Path::Avx2), _) => {
            "quantized decode: int8 activations, AVX2 byte multiply-adds (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; f32 block products for the rest)"
        }
        (None, true) => "quantized decode: AVX-512 block products",
        (None, false) => "quantized decode: portable",
    };
    format!("{bf16}; {quant}")
}
