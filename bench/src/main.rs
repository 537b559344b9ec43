//! vncgate-bench: a synthetic RFB server and a load generator that drives it directly over TCP
//! or TLS, through vncgate, or through websockify (ws:// or wss://), doing the same work on
//! every path. See BENCHMARKS.md
//! and `scripts/bench`.

mod client;
mod conn;
mod procinfo;
mod report;
mod rfb;
mod server;
mod tls;
mod tokens;

use std::io;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vncgate-bench",
    version,
    about = "Benchmark vncgate against direct TCP and websockify"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Synthetic VNC server: RFB 3.8 handshake (security None), then updates or echo.
    Server(server::ServerArgs),
    /// Load generator; prints one JSON line per run on stdout.
    Client(client::ClientArgs),
    /// Print N free TCP ports on 127.0.0.1, one per line.
    FreePorts {
        #[arg(default_value_t = 1)]
        count: usize,
    },
    /// Write a self-signed certificate for 127.0.0.1 (cert.pem, key.pem) for the TLS paths.
    TlsCert(tls::CertArgs),
    /// Summarize JSON lines from several runs as Markdown tables (medians, ranges, targets).
    Report(report::ReportArgs),
}

/// A Tokio runtime with `threads` workers; 1 means a current-thread runtime (no work stealing,
/// no cross-thread wake-ups: the cheapest load generator).
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    // Hold every listener until all are chosen, so the ports are distinct.
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::main(args).map_err(|e| format!("server: {e}")),
        Command::Client(args) => client::main(args),
        Command::FreePorts { count } => free_ports(count)
            .map(|ports| {
                for p in ports {
                    println!("{p}");
                }
            })
            .map_err(|e| format!("free-ports: {e}")),
        Command::Report(args) => report::main(args),
        Command::TlsCert(args) => tls::write_cert(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
