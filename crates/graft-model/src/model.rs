//! The decoder's parameters on a device: [`Model`] holds the weights of every layer in their
//! compute storage, plus the RoPE table, and is generic over the [`Backend`].

use crate::config::{ModelSpec, RopeScaling};
use crate::error::ModelError;
use crate::lora::LoraLinear;
use crate::weights::WeightStore;
use graft_kernels::AttentionShape;
use graft_kernels::Backend;
use graft_kernels::quant::QuantTensor;

/// Index of each linear projection inside a layer (the LoRA target names in PEFT order).
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// Query projection.
pub const Q: usize = 0;
/// Key projection.
pub const K: usize = 1;
/// Value projection.
pub const V: usize = 2;
/// Attention output projection.
pub const O: usize = 3;
/// MLP gate projection.
pub const GATE: usize = 4;
/// MLP up projection.
pub const UP: usize = 5;
/// MLP down projection.
pub const DOWN: usize = 6;

/// The Hugging Face tensor name prefix of linear `index` in layer `layer`.
pub fn linear_hf_name(layer: usize, index: usize) -> String {
    let block = if index <= O { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{block}.{}", LINEAR_NAMES[index])
}

/// One linear projection `y = x Wᵀ + b`.
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub w: B::Weight,
    pub bias: Option<B::Buf>,
    pub out: usize,
    pub inp: usize,
}

/// Weights of one decoder layer.
pub struct Layer<B: Backend> {
    pub attn_norm: B::Buf,
    pub mlp_norm: B::Buf,
    /// Indexed by [`Q`], [`K`], [`V`], [`O`], [`GATE`], [`UP`], [`DOWN`].
    pub linears: [Linear<B>; 7],
    /// Qwen3 per-head norms.
    pub q_norm: Option<B::Buf>,
    pub k_norm: Option<B::Buf>,
    /// The active LoRA adapter's modules, same indexing as `linears`.
    pub lora: [Option<LoraLinear<B>>; 7],
}

/// A decoder-only transformer on backend `B`.
pub struct Model<B: Backend> {
    pub spec: ModelSpec,
    pub backend: B,
    /// `[vocab, hidden]`.
    pub embed: B::Weight,
    pub layers: Vec<Layer<B>>,
    pub final_norm: B::Buf,
    /// `[vocab, hidden]`; `None` when tied to `embed` (and in a reward model, which has none).
    pub lm_head: Option<B::Weight>,
    /// A reward model's `score` head, `[1, hidden]` (HF `*ForSequenceClassification`, PEFT's
    /// `modules_to_save`): reads one scalar from the final hidden state of a sequence.
    pub score: Option<B::Buf>,
    pub rope: B::Rope,
}

/// How frozen matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// f32 (needed for full fine-tuning and exact mode).
    #[default]
    F32,
    /// Frozen and compact: used for the base weights in fast mode (LoRA training, serving).
    /// Matrices are bf16 (half the memory of f32), except those [`Model::from_weights`] reads in
    /// a ggml block-quantized type (a GGUF Q4_K_M … base): they stay in their blocks, costing
    /// about their file size, and the matrix products read the blocks (`quant_matmul.rs`).
    Bf16,
}

/// Bytes the base weights of `spec` take on the host once [`Model::from_weights`] has read them
/// from `weights` with `storage` (what the memory planner counts): matrices in their storage
/// type (or their blocks, see [`WeightStorage::Bf16`]), vectors f32.
pub fn stored_weight_bytes(spec: &ModelSpec, weights: &WeightStore, storage: WeightStorage) -> u64 {
    crate::weights::hf_tensor_shapes(spec)
        .iter()
        .map(|(name, shape)| {
            let numel: usize = shape.iter().product();
            let info = weights.info(name);
            let blocks = info
                .filter(|i| storage == WeightStorage::Bf16 && i.shape.len() == 2)
                .and_then(|i| i.dtype.quant_type().and(i.dtype.storage_bytes(numel)));
            match (blocks, shape.len(), storage) {
                (Some(bytes), _, _) => bytes as u64,
                (None, 2, WeightStorage::Bf16) if name != "score.weight" => numel as u64 * 2,
                _ => numel as u64 * 4,
            }
        })
        .sum()
}

/// RoPE inverse frequencies for a spec, as transformers computes them (incl. llama3 scaling).
pub fn rope_inv_freq(spec: &ModelSpec) -> Vec<f32> {
    let d = spec.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / spec.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match spec.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl<B: Backend> Model<B> {
    /// Builds the model from loaded weights; every tensor is checked by name and shape. With
    /// [`WeightStorage::Bf16`], matrices stored block-quantized stay in their blocks.
    pub fn from_weights(
        backend: B,
        spec: &ModelSpec,
        weights: &WeightStore,
        storage: WeightStorage,
    ) -> Result<Model<B>, ModelError> {
        Model::build(
            backend,
            spec,
            storage,
            |name, shape| weights.f32(name, shape),
            |name, shape| match storage {
                WeightStorage::Bf16 => weights.quantized(name, shape),
                WeightStorage::F32 => Ok(None),
            },
        )
    }

    /// Builds the model from a function that yields each tensor (HF name, expected shape) as f32.
    /// Tensors are uploaded one at a time, so at most one extra host copy exists at once.
    pub fn from_tensor_fn(
        backend: B,
        spec: &ModelSpec,
        storage: WeightStorage,
        tensor: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, ModelError>,
    ) -> Result<Model<B>, ModelError> {
        Model::build(backend, spec, storage, tensor, |_, _| Ok(None))
    }

    /// [`Model::from_tensor_fn`], where `quantized` may instead yield a matrix in its ggml blocks
    /// (kept as they are).
    fn build(
        backend: B,
        spec: &ModelSpec,
        storage: WeightStorage,
        mut tensor: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, ModelError>,
        quantized: impl Fn(&str, &[usize]) -> Result<Option<QuantTensor>, ModelError>,
    ) -> Result<Model<B>, ModelError> {
        let b = &backend;
        let (h, inter) = (spec.hidden_size, spec.intermediate_size);
        let bf16 = storage == WeightStorage::Bf16;
        let tensor = std::cell::RefCell::new(&mut tensor);
        let vec = |name: &str, n: usize| -> Result<B::Buf, ModelError> {
            Ok(b.upload(&(tensor.borrow_mut())(name, &[n])?))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Weight, ModelError> {
            if let Some(q) = quantized(name, &[rows, cols])? {
                return Ok(b.weight_quantized(q));
            }
            Ok(b.weight(&(tensor.borrow_mut())(name, &[rows, cols])?, rows, cols, bf16))
        };
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let p = format!("model.layers.{l}");
            let dims = [
                (spec.q_dim(), h),
                (spec.kv_dim(), h),
                (spec.kv_dim(), h),
                (h, spec.q_dim()),
                (inter, h),
                (inter, h),
                (h, inter),
            ];
            let mut linears = Vec::with_capacity(7);
            for (i, &(out, inp)) in dims.iter().enumerate() {
                let name = linear_hf_name(l, i);
                let has_bias = match i {
                    Q | K | V => spec.qkv_bias,
                    O => spec.o_bias,
                    _ => spec.mlp_bias,
                };
                let bias = if has_bias {
                    Some(vec(&format!("{name}.bias"), out)?)
                } else {
                    None
                };
                linears.push(Linear {
                    w: mat(&format!("{name}.weight"), out, inp)?,
                    bias,
                    out,
                    inp,
                });
            }
            let linears: [Linear<B>; 7] = linears.try_into().unwrap_or_else(|_| unreachable!());
            layers.push(Layer {
                attn_norm: vec(&format!("{p}.input_layernorm.weight"), h)?,
                mlp_norm: vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                linears,
                q_norm: if spec.qk_norm {
                    Some(vec(&format!("{p}.self_attn.q_norm.weight"), spec.head_dim)?)
                } else {
                    None
                },
                k_norm: if spec.qk_norm {
                    Some(vec(&format!("{p}.self_attn.k_norm.weight"), spec.head_dim)?)
                } else {
                    None
                },
                lora: Default::default(),
            });
        }
        let embed = mat("model.embed_tokens.weight", spec.vocab_size, h)?;
        let lm_head = if spec.tie_word_embeddings || spec.sequence_classifier {
            None
        } else {
            Some(mat("lm_head.weight", spec.vocab_size, h)?)
        };
        let score = if spec.sequence_classifier {
            Some(b.upload(&(tensor.borrow_mut())("score.weight", &[1, h])?))
        } else {
            None
        };
        let final_norm = vec("model.norm.weight", h)?;
        let rope = b.rope_table(&rope_inv_freq(spec), spec.max_position_embeddings.max(1));
        Ok(Model {
            spec: spec.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            score,
            rope,
            backend,
        })
    }

    /// Makes this model a reward model: a `score` head (`[1, hidden]`, `weight`) replaces the LM
    /// head, and the spec says `*ForSequenceClassification` (so exports write that layout).
    pub fn attach_score_head(&mut self, weight: &[f32]) {
        assert_eq!(weight.len(), self.spec.hidden_size, "score head is [1, hidden]");
        self.score = Some(self.backend.upload(weight));
        self.lm_head = None;
        self.spec.sequence_classifier = true;
    }

    /// Lays out the frozen matrices (projections and LM head) for inference only, where the
    /// backend has a faster layout ([`Backend::weight_pack_for_inference`]; on CPUs with bf16 dot
    /// products, bf16 weights become the GEMM's panels: decode streams them with no copy, and a
    /// row's result no longer depends on how many rows share the product). For serving and
    /// generation; a model that will be trained keeps its layout.
    pub fn pack_for_inference(&mut self) {
        let b = &self.backend;
        for layer in &mut self.layers {
            for lin in &mut layer.linears {
                b.weight_pack_for_inference(&mut lin.w);
            }
        }
        match &mut self.lm_head {
            Some(head) => b.weight_pack_for_inference(head),
            None => b.weight_pack_for_inference(&mut self.embed),
        }
    }

    /// The LM head matrix (the embedding when tied).
    pub fn head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Attention geometry of this model (`bf16`: fast-mode products).
    pub fn attention_shape(&self, precision: graft_kernels::Precision) -> AttentionShape {
        AttentionShape {
            n_heads: self.spec.num_heads,
            n_kv_heads: self.spec.num_kv_heads,
            head_dim: self.spec.head_dim,
            window: self.spec.sliding_window,
            bf16: precision.effective() == graft_kernels::Precision::Fast,
        }
    }

    /// Rebuilds the RoPE table to cover `positions` positions (long sequences beyond the config).
    pub fn ensure_positions(&mut self, positions: usize) {
        if positions > self.spec.max_position_embeddings {
            self.spec.max_position_embeddings = positions;
            self.rope = self.backend.rope_table(&rope_inv_freq(&self.spec), positions);
        }
    }

    /// Every base tensor with its Hugging Face name and shape, as host f32 (for export).
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let b = &self.backend;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.spec.vocab_size, self.spec.hidden_size],
            b.weight_to_host(&self.embed),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                vec![self.spec.hidden_size],
                b.download(&layer.attn_norm),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![self.spec.hidden_size],
                b.download(&layer.mlp_norm),
            ));
            for (i, lin) in layer.linears.iter().enumerate() {
                let name = linear_hf_name(l, i);
                out.push((
                    format!("{name}.weight"),
                    vec![lin.out, lin.inp],
                    b.weight_to_host(&lin.w),
                ));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{name}.bias"), vec![lin.out], b.download(bias)));
                }
            }
            if let Some(n) = &layer.q_norm {
                out.push((
                    format!("{p}.self_attn.q_norm.weight"),
                    vec![self.spec.head_dim],
                    b.download(n),
                ));
            }
            if let Some(n) = &layer.k_norm {
                out.push((
                    format!("{p}.self_attn.k_norm.weight"),
                    vec![self.spec.head_dim],
                    b.download(n),
                ));
            }
        }
        out.push((
            "model.norm.weight".into(),
            vec![self.spec.hidden_size],
            b.download(&self.final_norm),
        ));
        if let Some(head) = &self.lm_head {
            out.push((
                "lm_head.weight".into(),
                vec![self.spec.vocab_size, self.spec.hidden_size],
                b.weight_to_host(head),
            ));
        }
        if let Some(score) = &self.score {
            out.push((
                "score.weight".into(),
                vec![1, self.spec.hidden_size],
                b.download(score),
            ));
        }
        out
    }
}
