//! Runs the real `imgfleet validate` binary against seed and malformed files.
