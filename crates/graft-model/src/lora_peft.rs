//! Conversion between the device-side adapters ([`crate::lora`]) and PEFT's host format
//! ([`crate::peft`]).

use crate::lora::{Adapter, LoraLinear};
use crate::model::Model;
use crate::peft::{LayerLora, LoraAdapter, LoraAdapterConfig, LoraModule, LoraPair};
use graft_kernels::Backend;

impl<B: Backend> Model<B> {
    /// Uploads a PEFT adapter as a standalone [`Adapter`] (for per-request adapters in serving).
    pub fn upload_adapter(&self, adapter: &LoraAdapter) -> Adapter<B> {
        let layers = self
            .layers
            .iter()
            .zip(&adapter.layers)
            .map(|(layer, la)| {
                std::array::from_fn(|i| {
                    la.get(LoraModule::ALL[i]).map(|p| LoraLinear {
                        a: self.backend.weight(&p.a, p.r, layer.linears[i].inp, false),
                        b: self.backend.weight(&p.b, layer.linears[i].out, p.r, false),
                        r: p.r,
                        scale: p.scale,
                    })
                })
            })
            .collect();
        Adapter { layers }
    }

    /// Attaches a loaded PEFT adapter (replacing any active one). An adapter that carries a score
    /// head (a reward model's, in `modules_to_save`) makes this model a reward model.
    pub fn set_adapter(&mut self, adapter: &LoraAdapter) {
        for (layer, la) in self.layers.iter_mut().zip(&adapter.layers) {
            for (i, module) in LoraModule::ALL.into_iter().enumerate() {
                layer.lora[i] = la.get(module).map(|p| LoraLinear {
                    a: self.backend.weight(&p.a, p.r, layer.linears[i].inp, false),
                    b: self.backend.weight(&p.b, layer.linears[i].out, p.r, false),
                    r: p.r,
                    scale: p.scale,
                });
            }
        }
        if let Some(w) = &adapter.score {
            self.attach_score_head(w);
        }
    }

    /// The active adapter as host data, for saving in PEFT format.
    pub fn adapter(&self, config: LoraAdapterConfig) -> LoraAdapter {
        let b = &self.backend;
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let mut out = LayerLora::default();
                for (i, module) in LoraModule::ALL.into_iter().enumerate() {
                    *out.get_mut(module) = layer.lora[i].as_ref().map(|m| LoraPair {
                        a: b.weight_to_host(&m.a),
                        b: b.weight_to_host(&m.b),
                        r: m.r,
                        scale: m.scale,
                    });
                }
                out
            })
            .collect();
        let score = (config.saves_score())
            .then(|| self.score.as_ref().map(|w| b.download(w)))
            .flatten();
        LoraAdapter {
            config,
            layers,
            score,
        }
    }
}
