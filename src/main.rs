//! The `vncgate` binary: parse the command line and hand over to [`vncgate::cli`].

fn main() {
    std::process::exit(vncgate::cli::main());
}
