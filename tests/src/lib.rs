//! weir's test lab: network namespaces made and removed by each test, real servers and
//! clients inside them, the real agent binary, and test frames.

pub mod netns;
pub mod packets;
