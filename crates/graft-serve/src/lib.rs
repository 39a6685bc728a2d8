//! graft-serve
