//! RESP framing on both sides of the proxy, and encoders for what sidecache writes itself.
//!
//! Owns: `request` (client bytes → argument vectors, with limits), `reply` (finding the end of
//! an upstream reply, with limits), and `encode` (commands forwarded upstream, replies sidecache
//! answers itself). This is the only module that names `redis_protocol` types, so an upgrade of
//! that crate touches one place.

pub mod encode;
pub mod reply;
pub mod request;
pub mod value;

pub use reply::{ReplyError, ReplyLimits, ReplyScanner};
pub use request::{RequestError, RequestLimits, RequestParser};
