//! Root package: holds the workspace integration tests in `tests/`.
