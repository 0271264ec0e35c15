//! PostgreSQL: the session tracker (sans-IO), parameter rendering, the target connection,
//! and the relay loop.

pub mod params;
pub mod relay;
pub mod session;
pub mod target;
