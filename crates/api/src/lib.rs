//! alcove-api (placeholder until its layer lands).
