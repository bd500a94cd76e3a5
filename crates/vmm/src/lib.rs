//! alcove-vmm (placeholder until its layer lands).
