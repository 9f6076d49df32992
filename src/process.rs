//! How the command-line programs end: one place that turns a `main` future's
//! result into an exit code, for the CLI and the agent alike.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs `main` to completion on `runtime` and returns its exit code. A
/// runtime that could not start, or a `main` that failed, is reported on
/// stderr as `error: …` with the whole cause chain, and exits 1.
pub fn block_on_main<E: Display>(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    main: impl Future<Output = Result<ExitCode, E>>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(format_args!("starting the async runtime: {e}")),
    };
    exit_code(runtime.block_on(main))
}

/// The exit code of a finished `main`: its own, or 1 after printing its
/// error as `error: …` with the whole cause chain.
pub fn exit_code<E: Display>(result: Result<ExitCode, E>) -> ExitCode {
    result.unwrap_or_else(|e| fail(format_args!("{e:#}")))
}

fn fail(message: std::fmt::Arguments<'_>) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
