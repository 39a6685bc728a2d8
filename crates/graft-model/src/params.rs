//! The parameter table: one typed id per trainable tensor, with its Hugging Face name, its PEFT
//! name and its weight-decay rule, and one walk that visits each trainable value together with
//! its gradient (so nothing is matched by name strings or zipped by position).

use crate::model::{Model, linear_hf_name};
use crate::train::{Grads, TrainMode};
use graft_kernels::{Backend, Cpu, Weight, WeightData};

/// Which tensor of the decoder a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamId {
    /// `model.embed_tokens.weight`.
    Embed,
    /// `model.layers.{l}.input_layernorm.weight`.
    AttnNorm(usize),
    /// `model.layers.{l}.post_attention_layernorm.weight`.
    MlpNorm(usize),
    /// Qwen3's `model.layers.{l}.self_attn.q_norm.weight`.
    QNorm(usize),
    /// Qwen3's `model.layers.{l}.self_attn.k_norm.weight`.
    KNorm(usize),
    /// The matrix of projection `proj` (indexed like [`crate::model::LINEAR_NAMES`]).
    Weight { layer: usize, proj: usize },
    /// The bias of projection `proj`.
    Bias { layer: usize, proj: usize },
    /// LoRA `A` (`[r, in]`) of projection `proj`.
    LoraA { layer: usize, proj: usize },
    /// LoRA `B` (`[out, r]`) of projection `proj`.
    LoraB { layer: usize, proj: usize },
    /// `model.norm.weight`.
    FinalNorm,
    /// `lm_head.weight` (absent when tied to the embedding).
    LmHead,
    /// A reward model's `score.weight` (`[1, hidden]`).
    Score,
}

impl ParamId {
    /// The tensor's name in a Hugging Face checkpoint (LoRA factors under their module's name,
    /// without PEFT's `base_model.model.` prefix).
    pub fn hf_name(self) -> String {
        match self {
            ParamId::Embed => "model.embed_tokens.weight".into(),
            ParamId::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            ParamId::MlpNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            ParamId::QNorm(l) => format!("model.layers.{l}.self_attn.q_norm.weight"),
            ParamId::KNorm(l) => format!("model.layers.{l}.self_attn.k_norm.weight"),
            ParamId::Weight { layer, proj } => format!("{}.weight", linear_hf_name(layer, proj)),
            ParamId::Bias { layer, proj } => format!("{}.bias", linear_hf_name(layer, proj)),
            ParamId::LoraA { layer, proj } => format!("{}.lora_A.weight", linear_hf_name(layer, proj)),
            ParamId::LoraB { layer, proj } => format!("{}.lora_B.weight", linear_hf_name(layer, proj)),
            ParamId::FinalNorm => "model.norm.weight".into(),
            ParamId::LmHead => "lm_head.weight".into(),
            ParamId::Score => "score.weight".into(),
        }
    }

    /// The key PEFT saves it under in `adapter_model.safetensors` (LoRA factors, and the score
    /// head as `modules_to_save`).
    pub fn peft_name(self) -> String {
        format!("base_model.model.{}", self.hf_name())
    }

    /// The name a run's checkpoint stores it under: PEFT keys when training an adapter, Hugging
    /// Face names when training every weight.
    pub fn name(self, mode: TrainMode) -> String {
        match mode {
            TrainMode::Lora => self.peft_name(),
            TrainMode::Full => self.hf_name(),
        }
    }

    /// Whether AdamW's weight decay applies: as in the HF Trainer, every parameter except biases
    /// and norm weights.
    pub fn decays(self) -> bool {
        !matches!(
            self,
            ParamId::AttnNorm(_)
                | ParamId::MlpNorm(_)
                | ParamId::QNorm(_)
                | ParamId::KNorm(_)
                | ParamId::Bias { .. }
                | ParamId::FinalNorm
        )
    }
}

/// One trainable tensor, its value and its gradient, visited together.
pub struct Trainable<'a> {
    /// Which tensor.
    pub id: ParamId,
    /// Its name in the run's checkpoint ([`ParamId::name`]).
    pub name: String,
    /// The value the optimizer updates.
    pub value: &'a mut [f32],
    /// Its gradient.
    pub grad: &'a mut Vec<f32>,
}

impl<B: Backend> Grads<B> {
    /// Every gradient buffer with its parameter, in the table's order (the order
    /// [`Model::trainable`] and [`Model::visit_params_mut`] use).
    pub fn for_each_mut<'a>(&'a mut self, mut f: impl FnMut(ParamId, &'a mut B::Buf)) {
        if let Some(g) = &mut self.embed {
            f(ParamId::Embed, g);
        }
        for (l, lg) in self.layers.iter_mut().enumerate() {
            if let Some(g) = &mut lg.attn_norm {
                f(ParamId::AttnNorm(l), g);
            }
            if let Some(g) = &mut lg.mlp_norm {
                f(ParamId::MlpNorm(l), g);
            }
            if let Some(g) = &mut lg.q_norm {
                f(ParamId::QNorm(l), g);
            }
            if let Some(g) = &mut lg.k_norm {
                f(ParamId::KNorm(l), g);
            }
            for (proj, (lin, lora)) in lg.linears.iter_mut().zip(lg.lora.iter_mut()).enumerate() {
                if let Some(g) = lin {
                    f(ParamId::Weight { layer: l, proj }, &mut g.w);
                    if let Some(bg) = &mut g.bias {
                        f(ParamId::Bias { layer: l, proj }, bg);
                    }
                }
                if let Some(g) = lora {
                    f(ParamId::LoraA { layer: l, proj }, &mut g.a);
                    f(ParamId::LoraB { layer: l, proj }, &mut g.b);
                }
            }
        }
        if let Some(g) = &mut self.final_norm {
            f(ParamId::FinalNorm, g);
        }
        if let Some(g) = &mut self.lm_head {
            f(ParamId::LmHead, g);
        }
        if let Some(g) = &mut self.score {
            f(ParamId::Score, g);
        }
    }
}

fn host(w: &mut Weight) -> Option<&mut [f32]> {
    match &mut w.data {
        WeightData::F32(v) => Some(v.as_mut_slice()),
        WeightData::Bf16(_)
        | WeightData::Bf16Panels(_)
        | WeightData::Quant(_)
        | WeightData::QuantInterleaved(_) => None,
    }
}

impl Model<Cpu> {
    /// Visits every trainable parameter of `mode` as a mutable host slice, in the table's order.
    /// A reward model's score head is trained in both modes (PEFT's `modules_to_save`).
    ///
    /// Full fine-tuning needs f32 weight storage; bf16-stored matrices are skipped there.
    pub fn visit_params_mut<'a>(&'a mut self, mode: TrainMode, mut f: impl FnMut(ParamId, &'a mut [f32])) {
        let full = mode == TrainMode::Full;
        if full && let Some(d) = host(&mut self.embed) {
            f(ParamId::Embed, d);
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            if full {
                f(ParamId::AttnNorm(l), &mut layer.attn_norm);
                f(ParamId::MlpNorm(l), &mut layer.mlp_norm);
                if let Some(n) = &mut layer.q_norm {
                    f(ParamId::QNorm(l), n);
                }
                if let Some(n) = &mut layer.k_norm {
                    f(ParamId::KNorm(l), n);
                }
            }
            for (proj, (lin, lora)) in layer.linears.iter_mut().zip(layer.lora.iter_mut()).enumerate() {
                if full {
                    if let Some(d) = host(&mut lin.w) {
                        f(ParamId::Weight { layer: l, proj }, d);
                    }
                    if let Some(b) = &mut lin.bias {
                        f(ParamId::Bias { layer: l, proj }, b);
                    }
                }
                if mode == TrainMode::Lora
                    && let Some(m) = lora
                {
                    if let Some(d) = host(&mut m.a) {
                        f(ParamId::LoraA { layer: l, proj }, d);
                    }
                    if let Some(d) = host(&mut m.b) {
                        f(ParamId::LoraB { layer: l, proj }, d);
                    }
                }
            }
        }
        if full {
            f(ParamId::FinalNorm, &mut self.final_norm);
            if let Some(h) = &mut self.lm_head
                && let Some(d) = host(h)
            {
                f(ParamId::LmHead, d);
            }
        }
        if let Some(s) = &mut self.score {
            f(ParamId::Score, s);
        }
    }

    /// Every trainable parameter of `mode` with its gradient in `grads`, paired by id. Errors
    /// when a parameter has no gradient buffer or a gradient no parameter (bf16-stored weights
    /// under full fine-tuning, or grads made for another mode), naming the tensor.
    pub fn trainable<'a>(
        &'a mut self,
        mode: TrainMode,
        grads: &'a mut Grads<Cpu>,
    ) -> Result<Vec<Trainable<'a>>, String> {
        let mut by_id = std::collections::BTreeMap::new();
        grads.for_each_mut(|id, g| {
            by_id.insert(id, g);
        });
        let mut out = Vec::with_capacity(by_id.len());
        let mut missing = None;
        self.visit_params_mut(mode, |id, value| match by_id.remove(&id) {
            Some(grad) if grad.len() == value.len() => out.push(Trainable {
                id,
                name: id.name(mode),
                value,
                grad,
            }),
            _ => missing = missing.or(Some(id)),
        });
        if let Some(id) = missing {
            return Err(format!(
                "parameter `{}` has no gradient buffer of its size",
                id.name(mode)
            ));
        }
        if let Some(id) = by_id.keys().next() {
            return Err(format!(
                "gradient `{}` has no trainable f32 parameter (full fine-tuning needs f32 weights)",
                id.name(mode)
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_decay_follow_hf_and_peft() {
        let q = ParamId::LoraA {
            layer: 3,
            proj: crate::model::Q,
        };
        assert_eq!(q.hf_name(), "model.layers.3.self_attn.q_proj.lora_A.weight");
        assert_eq!(
            q.name(TrainMode::Lora),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(ParamId::Score.peft_name(), "base_model.model.score.weight");
        assert_eq!(
            ParamId::Bias {
                layer: 0,
                proj: crate::model::DOWN
            }
            .hf_name(),
            "model.layers.0.mlp.down_proj.bias"
        );
        assert!(q.decays() && ParamId::Embed.decays() && ParamId::Score.decays());
        assert!(!ParamId::FinalNorm.decays() && !ParamId::QNorm(1).decays());
        assert!(!ParamId::Bias { layer: 0, proj: 0 }.decays());
    }
}
