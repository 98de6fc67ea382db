//! The programs are the `lb-ebpf` binary (`src/main.rs`), built for the BPF target by
//! `lb-agent/build.rs`. This library target only exists so that the agent can name the crate
//! as a build dependency, which makes cargo rebuild the agent when the programs change.
#![no_std]
