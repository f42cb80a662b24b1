//! The peer wire: framing (magic, version, kind, length, CRC), reconnect pacing and
//! bounded send queues. The message codec and the connections join them with the agent.

pub mod backoff;
pub mod codec;
pub mod frame;
pub mod peers;
pub mod send_queue;
