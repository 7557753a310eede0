//! fleet-agentd library.
