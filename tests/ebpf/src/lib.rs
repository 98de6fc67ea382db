//! The programs are the binary (`src/main.rs`), built for the BPF target by `tests/build.rs`.
#![no_std]
