//! Writing to standard output and standard error so that a closed pipe ends the
//! command quietly.
//!
//! Rust ignores SIGPIPE, so `imgfleet get repositories -o yaml | head -1` sees the
//! write fail with `BrokenPipe`, and std's `println!` panics on that with a
//! backtrace hint. The macros here replace `print!`, `println!`, `eprint!` and
//! `eprintln!` for the whole CLI (they are brought into scope with `#[macro_use]`
//! at the top of `cli/mod.rs`, ahead of every other module, so they shadow std's
//! and no call site can forget them). On a closed pipe the process exits at once
//! with status 141, what a shell reports for a process ended by SIGPIPE, as
//! `kubectl` or `cat` would be: no panic, no message, and a pipeline under
//! `set -o pipefail` still learns the output was cut short. Any other write
//! error on standard output (a full disk) is reported and exits 1.

use std::io::{self, Write};

/// Exit status after a closed pipe: 128 + SIGPIPE (13), as shells report a
/// process the signal ended.
pub const CLOSED_PIPE_EXIT: i32 = 141;

/// Which stream a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What to do after a failed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnError {
    /// Exit quietly with this status.
    ExitQuietly(i32),
    /// Say this on standard error, then exit 1.
    Fail(String),
    /// Carry on: nothing sensible can be done (standard error itself failed).
    Ignore,
}

/// Decides what a failed write means; pure so it can be tested.
pub fn on_error(stream: Stream, e: &io::Error) -> OnError {
    match (e.kind(), stream) {
        (io::ErrorKind::BrokenPipe, _) => OnError::ExitQuietly(CLOSED_PIPE_EXIT),
        (_, Stream::Stdout) => OnError::Fail(format!("cannot write to standard output: {e}")),
        (_, Stream::Stderr) => OnError::Ignore,
    }
}

/// Writes formatted text to `stream`; ends the process as [`on_error`] decides
/// when the write fails.
pub fn write(stream: Stream, args: std::fmt::Arguments<'_>) {
    let result = match stream {
        Stream::Stdout => io::stdout().lock().write_fmt(args),
        Stream::Stderr => io::stderr().lock().write_fmt(args),
    };
    if let Err(e) = result {
        match on_error(stream, &e) {
            OnError::ExitQuietly(code) => std::process::exit(code),
            OnError::Fail(message) => {
                let _ = writeln!(io::stderr(), "error: {message}");
                std::process::exit(1);
            }
            OnError::Ignore => {}
        }
    }
}

/// Writes the bytes as they are (terminal control sequences) and flushes, with
/// the same error handling as [`write`].
pub fn write_raw_and_flush(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        drop(out);
        match on_error(Stream::Stdout, &e) {
            OnError::ExitQuietly(code) => std::process::exit(code),
            OnError::Fail(message) => {
                let _ = writeln!(io::stderr(), "error: {message}");
                std::process::exit(1);
            }
            OnError::Ignore => {}
        }
    }
}

/// `print!` that ends quietly on a closed pipe.
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::cli::output::write($crate::cli::output::Stream::Stdout, format_args!($($arg)*))
    };
}

/// `println!` that ends quietly on a closed pipe.
macro_rules! println {
    () => {
        $crate::cli::output::write($crate::cli::output::Stream::Stdout, format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(
            $crate::cli::output::Stream::Stdout,
            format_args!("{}\n", format_args!($($arg)*)),
        )
    };
}

/// `eprint!` that ends quietly on a closed pipe.
#[allow(unused_macros)]
macro_rules! eprint {
    ($($arg:tt)*) => {
        $crate::cli::output::write($crate::cli::output::Stream::Stderr, format_args!($($arg)*))
    };
}

/// `eprintln!` that ends quietly on a closed pipe.
macro_rules! eprintln {
    () => {
        $crate::cli::output::write($crate::cli::output::Stream::Stderr, format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(
            $crate::cli::output::Stream::Stderr,
            format_args!("{}\n", format_args!($($arg)*)),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_exits_quietly_and_other_errors_are_reported() {
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let full = io::Error::other("No space left on device");
        let cases = [
            (Stream::Stdout, &pipe, OnError::ExitQuietly(141)),
            (Stream::Stderr, &pipe, OnError::ExitQuietly(141)),
            (
                Stream::Stdout,
                &full,
                OnError::Fail("cannot write to standard output: No space left on device".into()),
            ),
            (Stream::Stderr, &full, OnError::Ignore),
        ];
        for (stream, e, want) in cases {
            assert_eq!(on_error(stream, e), want, "{stream:?} {e}");
        }
    }
}
