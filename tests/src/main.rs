//! `weir-lab`: the lab's servers, the demo and the benchmarks.
//!
//! - `weir-lab serve --name N [--http ADDR]... [--https ADDR]... [--tcp ADDR]... [--udp ADDR]...
//!   [--sctp ADDR]...`
//!   (what every backend namespace runs; see `servers`).
//! - `weir-lab bench [--quick] [--only packet|maglev|throughput|nodeport|clusterip|prune|probes|l2|bgp|restart|synflood|fuzz] [--out FILE]`: every
//!   benchmark, as Markdown (`scripts/bench` writes `docs/benchmarks.md`; with `--only`, only
//!   that section of the file changes). Needs root.
//! - `weir-lab sockclient MODE ADDR N`: the socket hooks' test client (see `sockclient`).
//! - `weir-lab demo [--hold]`: the standalone lab with the agent on its embedded default
//!   config, and a tour of the traffic it carries. Needs root.

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
        Some("fake-apiserver") => {
            let addr = args.get(1).and_then(|a| a.parse().ok());
            let Some(addr) = addr else {
                eprintln!("usage: weir-lab fake-apiserver IP:PORT [STATE-FILE] [--seed FILE]");
                return ExitCode::from(2);
            };
            let mut rest = args[2..].iter();
            let (mut state, mut seed) = (None, None);
            while let Some(a) = rest.next() {
                if a == "--seed" {
                    seed = rest.next().map(std::path::Path::new);
                } else {
                    state = Some(std::path::Path::new(a));
                }
            }
            match weir_lab::fakeapi::serve(addr, state, seed) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weir-lab fake-apiserver: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("sockclient") => {
            ExitCode::from(u8::try_from(weir_lab::sockclient::run(&args[1..])).unwrap_or(1))
        }
        Some("demo") => match weir_lab::demo::run(args.iter().any(|a| a == "--hold")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir-lab demo: {e}");
                ExitCode::FAILURE
            }
        },
        Some("bench") => {
            let quick = args.iter().any(|a| a == "--quick");
            let out = args
                .iter()
                .position(|a| a == "--out")
                .and_then(|i| args.get(i + 1));
            let only = args
                .iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .map(String::as_str);
            if let Some(o) = only
                && !weir_lab::bench::NAMES.contains(&o)
            {
                eprintln!(
                    "weir-lab bench: --only {o}: not one of {}",
                    weir_lab::bench::NAMES.join(", ")
                );
                return ExitCode::from(2);
            }
            let mut command = "scripts/bench".to_string();
            if quick {
                command.push_str(" --quick");
            }
            if let Some(o) = only {
                command.push_str(&format!(" --only {o}"));
            }
            let previous = out.and_then(|p| std::fs::read_to_string(p).ok());
            let md = weir_lab::bench::run_all(quick, &command, only, previous.as_deref());
            match out {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, &md) {
                        eprintln!("weir-lab bench: {path}: {e}");
                        return ExitCode::FAILURE;
                    }
                    eprintln!("bench: wrote {path}");
                }
                None => print!("{md}"),
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: weir-lab serve --name N [--http ADDR] [--https ADDR] [--tcp ADDR] [--udp ADDR] [--sctp ADDR]\n       weir-lab bench [--quick] [--only packet|maglev|throughput|nodeport|clusterip|prune|probes|l2|bgp|restart] [--out FILE]\n       weir-lab demo [--hold]"
            );
            ExitCode::from(2)
        }
    }
}
