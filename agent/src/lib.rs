//! The in-guest agent; arrives with the agent issue.
