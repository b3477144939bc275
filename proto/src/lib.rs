//! Protocol definitions shared by husk components (the agent API arrives with the agent).
