//! Conversion between the device-side adapters ([`crate::lora`]) and PEFT's host format.

use crate::lora::LoraModule;
use crate::model::Model;
use crate::peft::{LayerLora, LoraAdapter, LoraAdapterConfig, LoraPair};
use graft_kernels::Backend;

impl<B: Backend> Model<B> {
    /// Attaches a loaded PEFT adapter (replacing any active one).
    pub fn set_adapter(&mut self, adapter: &LoraAdapter) {
        for (layer, la) in self.layers.iter_mut().zip(&adapter.layers) {
            for i in 0..7 {
                layer.lora[i] = la.modules[i].as_ref().map(|p| LoraModule {
                    a: self.backend.weight(&p.a, p.r, layer.linears[i].inp, false),
                    b: self.backend.weight(&p.b, layer.linears[i].out, p.r, false),
                    r: p.r,
                    scale: p.scale,
                });
            }
        }
    }

    /// The active adapter as host data, for saving in PEFT format.
    pub fn adapter(&self, config: LoraAdapterConfig) -> LoraAdapter {
        let b = &self.backend;
        let layers = self
            .layers
            .iter()
            .map(|layer| crate::peft::LayerLora {
                modules: std::array::from_fn(|i| {
                    layer.lora[i].as_ref().map(|m| LoraPair {
                        a: b.weight_to_host(&m.a),
                        b: b.weight_to_host(&m.b),
                        r: m.r,
                        scale: m.scale,
                    })
                }),
            })
            .collect();
        LoraAdapter { config, layers }
    }
}
