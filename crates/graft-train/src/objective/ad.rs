//! Forward-mode differentiation for the closed-form pair losses (DPO, CPO, ORPO): a value with
//! its gradient w.r.t. every pair's summed chosen and rejected log-prob, so each loss is written
//! once, as its formula, and gets its exact gradient.

/// A value with its gradient w.r.t. the `2P` policy inputs (`[chosen_0.., rejected_0..]`):
/// forward-mode differentiation, enough for TRL's closed-form losses over small batches.
#[derive(Clone, Debug)]
pub(crate) struct Ad {
    pub(crate) v: f64,
    pub(crate) g: Vec<f64>,
}

impl Ad {
    pub(crate) fn constant(v: f64, n: usize) -> Ad {
        Ad { v, g: vec![0.0; n] }
    }
    pub(crate) fn input(v: f64, slot: usize, n: usize) -> Ad {
        let mut a = Ad::constant(v, n);
        a.g[slot] = 1.0;
        a
    }
    /// `f(self)` with `f'(self.v) = d`.
    pub(crate) fn chain(&self, v: f64, d: f64) -> Ad {
        Ad {
            v,
            g: self.g.iter().map(|x| x * d).collect(),
        }
    }
    pub(crate) fn add(&self, o: &Ad) -> Ad {
        Ad {
            v: self.v + o.v,
            g: self.g.iter().zip(&o.g).map(|(a, b)| a + b).collect(),
        }
    }
    pub(crate) fn sub(&self, o: &Ad) -> Ad {
        Ad {
            v: self.v - o.v,
            g: self.g.iter().zip(&o.g).map(|(a, b)| a - b).collect(),
        }
    }
    pub(crate) fn mul(&self, o: &Ad) -> Ad {
        Ad {
            v: self.v * o.v,
            g: self
                .g
                .iter()
                .zip(&o.g)
                .map(|(a, b)| a * o.v + b * self.v)
                .collect(),
        }
    }
    pub(crate) fn scale(&self, k: f64) -> Ad {
        self.chain(self.v * k, k)
    }
    pub(crate) fn offset(&self, k: f64) -> Ad {
        self.chain(self.v + k, 1.0)
    }
    pub(crate) fn square(&self) -> Ad {
        self.chain(self.v * self.v, 2.0 * self.v)
    }
    pub(crate) fn exp(&self) -> Ad {
        let e = self.v.exp();
        self.chain(e, e)
    }
    pub(crate) fn sigmoid(&self) -> Ad {
        let s = sigmoid(self.v);
        self.chain(s, s * (1.0 - s))
    }
    pub(crate) fn log_sigmoid(&self) -> Ad {
        self.chain(log_sigmoid(self.v), sigmoid(-self.v))
    }
    pub(crate) fn relu(&self) -> Ad {
        self.chain(self.v.max(0.0), if self.v > 0.0 { 1.0 } else { 0.0 })
    }
}

pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x)`, stable for large |x|.
pub(crate) fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// The mean of per-pair values.
pub(crate) fn mean(xs: &[Ad], n: usize) -> Ad {
    let mut acc = Ad::constant(0.0, n);
    for x in xs {
        acc = acc.add(x);
    }
    acc.scale(1.0 / xs.len().max(1) as f64)
}

/// Sorted ascending by value, as `torch.sort` (ties keep their order).
pub(crate) fn sorted(mut xs: Vec<Ad>) -> Vec<Ad> {
    xs.sort_by(|a, b| a.v.total_cmp(&b.v));
    xs
}

impl Ad {
    /// `log(1 − e^x)` for `x < 0`, stable on both sides of `−ln 2` (as TRL's `log1mexp`).
    pub(crate) fn log1mexp(&self) -> Ad {
        let x = self.v;
        let v = if x < -std::f64::consts::LN_2 {
            (-x.exp()).ln_1p()
        } else {
            (-x.exp_m1()).ln()
        };
        self.chain(v, 1.0 / (1.0 - (-x).exp()))
    }
}
