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
        Some("bench-packet") => {
            let r = weir_lab::bench::packet::run(args.iter().any(|a| a == "--quick"));
            println!(
                "floor {:.1} ns (repeat {} x {} rounds)",
                r.floor_ns, r.repeat, r.rounds
            );
            for c in r.cases {
                println!(
                    "{:40} {:6.1} ns  (+{:.1} over floor)",
                    c.name,
                    c.ns,
                    c.ns - r.floor_ns
                );
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: weir-lab serve --name N [--http ADDR] [--udp ADDR] [--sctp ADDR]");
            ExitCode::from(2)
        }
    }
}
