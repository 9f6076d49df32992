//! Placement: which clusters receive which repositories (a pure function).
