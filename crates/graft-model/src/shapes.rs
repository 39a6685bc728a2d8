//! Named model shapes for benchmarks and demos, and random initialisation of a model of any spec.

use crate::config::{Architecture, ModelSpec, RopeScaling};
use crate::model::{Model, WeightStorage};
use graft_kernels::Backend;
use graft_kernels::rng::splitmix64;

/// Shape names accepted by [`named_shape`].
pub const SHAPE_NAMES: [&str; 5] = [
    "smollm2-135m",
    "qwen2.5-0.5b",
    "llama-3.2-1b",
    "stories260k",
    "tiny",
];

fn llama(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    theta: f32,
) -> ModelSpec {
    ModelSpec {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        sequence_classifier: false,
    }
}

/// The architecture of a well-known model (random weights are made by [`random_weights`]).
pub fn named_shape(name: &str) -> Option<ModelSpec> {
    Some(match name {
        "smollm2-135m" => llama(49152, 576, 1536, 30, 9, 3, 100000.0),
        "qwen2.5-0.5b" => ModelSpec {
            architecture: Architecture::Qwen2,
            qkv_bias: true,
            rms_norm_eps: 1e-6,
            ..llama(151936, 896, 4864, 24, 14, 2, 1e6)
        },
        "llama-3.2-1b" => ModelSpec {
            rope_scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            ..llama(128256, 2048, 8192, 16, 32, 8, 500000.0)
        },
        "stories260k" => ModelSpec {
            max_position_embeddings: 512,
            ..llama(512, 64, 172, 5, 8, 4, 10000.0)
        },
        "tiny" => ModelSpec {
            max_position_embeddings: 1024,
            ..llama(256, 64, 128, 2, 4, 2, 10000.0)
        },
        _ => return None,
    })
}

/// Deterministic random values for tensor `name` of `shape` (normal-ish, std 0.02; norms 1;
/// biases 0). Each tensor's stream depends only on the seed and its name.
pub fn random_tensor(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return vec![1.0; n];
    }
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    let name_hash = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, c| {
        (h ^ c as u64).wrapping_mul(0x100_0000_01B3)
    });
    let mut state = seed ^ name_hash;
    (0..n)
        .map(|_| {
            let z = splitmix64(&mut state);
            // Irwin–Hall(4) approximation of a unit normal: cheap and plenty for random weights.
            let u = |s: u64| (s & 0xFFFF) as f32 / 65536.0;
            (u(z) + u(z >> 16) + u(z >> 32) + u(z >> 48) - 2.0) * 1.732 * 0.02
        })
        .collect()
}

impl<B: Backend> Model<B> {
    /// A model of `spec` with deterministic random weights ([`random_tensor`]).
    pub fn random(backend: B, spec: &ModelSpec, seed: u64, storage: WeightStorage) -> Model<B> {
        Model::from_tensor_fn(backend, spec, storage, |name, shape| {
            Ok(random_tensor(name, shape, seed))
        })
        .expect("random tensors always have the requested shape")
    }
}

#[cfg(test)]
mod tests {
    /// The random init as it was before the RNG moved to `graft_kernels::rng`.
    #[test]
    fn random_init_is_pinned() {
        let bits: Vec<u32> = super::random_tensor("model.layers.0.mlp.up_proj.weight", &[2, 3], 9)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            bits,
            vec![
                3161820079, 1008881787, 1010908478, 992121030, 3174159686, 1006660429
            ]
        );
    }
}
