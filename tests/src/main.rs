//! `weir-lab`: the lab's servers, the demo and the benchmarks.
//!
//! - `weir-lab serve --name N [--http ADDR]... [--udp ADDR]... [--sctp ADDR]...`
//!   (what every backend namespace runs; see `servers`).

use std::process::ExitCode;

use weir_lab::servers::{ServeArgs, serve};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => match ServeArgs::parse(&args[1..]) {
            Ok(a) => match serve(a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weir-lab serve: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("weir-lab serve: {e}");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: weir-lab serve --name N [--http ADDR] [--udp ADDR] [--sctp ADDR]");
            ExitCode::from(2)
        }
    }
}
