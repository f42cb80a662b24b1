//! The peer wire: framing (magic, version, kind, length, CRC) and, later, the message
//! codec and peer connections.

pub mod frame;
