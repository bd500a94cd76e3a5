//! alcove-node (placeholder until its layer lands).
