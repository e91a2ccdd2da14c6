//! User rules: conditions over observed facts, actions from a fixed set (see the agent).
