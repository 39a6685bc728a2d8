//! graft-train
