//! The control API: HTTP/1.1 + JSON over a Unix socket (see ARCHITECTURE.md).

pub mod client;
pub mod events;
pub mod http;
