//! The `imgfleet` command line: validate resource files offline, and apply,
//! get, describe, delete and enroll against the hub's admin API.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
