//! alcove-store (placeholder until its layer lands).
