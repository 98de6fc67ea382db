//! `weir-lab bench`: the benchmarks, apart from the tests. Each one measures weir and its
//! baseline side by side in one run, on this machine, and `report` writes the figures with the
//! machine and the command into `docs/benchmarks.md`. Nothing here asserts on time.

pub mod packet;
