//! Runs hub-talking verbs of the real `imgfleet` binary against an unreachable hub.
