//! graft-kernels
