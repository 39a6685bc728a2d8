//! CPU implementations of the engine's ops, each a forward/backward pair over plain buffers.

pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod gemm_bf16;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant_matmul;
pub mod rope;
