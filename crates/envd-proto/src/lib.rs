//! alcove-envd-proto (placeholder until its layer lands).
