//! alcove-image (placeholder until its layer lands).
