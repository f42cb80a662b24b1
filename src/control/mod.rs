//! The control API: HTTP/1.1 + JSON over a Unix socket (see ARCHITECTURE.md).

pub mod api;
pub mod client;
pub mod ctl;
pub mod events;
pub mod http;
pub mod server;
