//! alcove-agent-client (placeholder until its layer lands).
