//! weir's test lab: network namespaces made and removed by each test, real servers and
//! clients inside them, the real agent binary, and test frames.

pub mod agent;
pub mod bench;
pub mod bgplab;
pub mod cgroup;
pub mod chart;
pub mod clients;
pub mod demo;
pub mod fakeapi;
pub mod flood;
pub mod framefuzz;
pub mod image;
pub mod l2lab;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod predict;
pub mod prometheus;
pub mod sctp;
pub mod servers;
pub mod sockclient;
pub mod spoof;
pub mod testbed;
pub mod transfers;
pub mod xdp;
