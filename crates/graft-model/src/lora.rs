//! LoRA on the decoder's linear projections: `y = W x + b + scale · B (A dropout(x))`.
//!
//! [`LoraLinear`] holds one projection's `A` (`[r, in]`) and `B` (`[out, r]`) on the device; a
//! [`LoraSpec`] says which projections get one, their rank and scale. Conversion to and from
//! PEFT's on-disk adapters lives in [`crate::peft`].

use crate::model::{LINEAR_NAMES, Model};
use graft_kernels::Backend;
use graft_kernels::rng::normal_stream;

/// One projection's adapter.
pub struct LoraLinear<B: Backend> {
    /// `[r, in]`.
    pub a: B::Weight,
    /// `[out, r]`.
    pub b: B::Weight,
    pub r: usize,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
}

/// An adapter resident on the device, independent of the model's active one: what a server
/// keeps per loaded adapter and passes per sequence to [`Model::forward_batch`].
pub struct Adapter<B: Backend> {
    /// Per decoder layer, per projection (indexed like [`LINEAR_NAMES`]).
    pub layers: Vec<[Option<LoraLinear<B>>; 7]>,
}

impl<B: Backend> Adapter<B> {
    /// Bytes of device memory the adapter holds.
    pub fn bytes(&self, b: &B) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|m| b.weight_bytes(&m.a) + b.weight_bytes(&m.b))
            .sum()
    }
}

/// Which projections get an adapter, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f32,
    pub rslora: bool,
    /// Dropout on the adapter's input during training (0 = none).
    pub dropout: f32,
    /// Per projection (indexed like [`LINEAR_NAMES`]).
    pub targets: [bool; 7],
}

impl LoraSpec {
    /// The scale multiplying `B A x`.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Parses target names (`q_proj`, …, or `all-linear`); an unknown name is an error naming it.
    pub fn targets_from_names(names: &[String]) -> Result<[bool; 7], String> {
        let mut t = [false; 7];
        for n in names {
            if n == "all-linear" || n == "all" {
                return Ok([true; 7]);
            }
            match LINEAR_NAMES.iter().position(|x| x == n) {
                Some(i) => t[i] = true,
                None => {
                    return Err(format!(
                        "unknown LoRA target `{n}`; expected any of {}",
                        LINEAR_NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(t)
    }

    /// The target names in PEFT order.
    pub fn target_names(&self) -> Vec<String> {
        LINEAR_NAMES
            .iter()
            .zip(self.targets)
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect()
    }
}

impl<B: Backend> Model<B> {
    /// Attaches fresh adapters as PEFT initialises them: `A` Kaiming-uniform-like random
    /// (here: normal with std `1/sqrt(in)`), `B` zero — so the model's output is unchanged.
    pub fn init_lora(&mut self, spec: &LoraSpec, seed: u64) {
        let scale = spec.scale();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for i in 0..7 {
                layer.lora[i] = if spec.targets[i] {
                    let (out, inp) = (layer.linears[i].out, layer.linears[i].inp);
                    let a = normal_stream(
                        seed ^ ((l * 7 + i) as u64).wrapping_mul(0x1000_0001),
                        spec.r * inp,
                        1.0 / (inp as f32).sqrt(),
                    );
                    Some(LoraLinear {
                        a: self.backend.weight(&a, spec.r, inp, false),
                        b: self.backend.weight(&vec![0.0; out * spec.r], out, spec.r, false),
                        r: spec.r,
                        scale,
                    })
                } else {
                    None
                };
            }
        }
    }

    /// Removes the active adapter.
    pub fn clear_adapter(&mut self) {
        for layer in &mut self.layers {
            layer.lora = Default::default();
        }
    }

    /// Folds the active adapter into the base weights (`W += scale · B A`) and removes it.
    pub fn merge_adapter(&mut self) {
        let b = &self.backend;
        for layer in &mut self.layers {
            for i in 0..7 {
                if let Some(m) = layer.lora[i].take() {
                    let lin = &mut layer.linears[i];
                    let mut w = b.weight_to_host(&lin.w);
                    let (av, bv) = (b.weight_to_host(&m.a), b.weight_to_host(&m.b));
                    crate::peft::add_lora_delta(&mut w, &av, &bv, m.r, m.scale, lin.inp);
                    let buf = b.upload(&w);
                    b.weight_update(&mut lin.w, &buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The adapter init stream as it was before the RNG moved to `graft_kernels::rng`.
    #[test]
    fn init_stream_is_pinned() {
        let bits: Vec<u32> = super::normal_stream(12345, 6, 0.5)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            bits,
            vec![
                1049625306, 1055669444, 3197841230, 3211675495, 1053873962, 3207315674
            ]
        );
    }
}
