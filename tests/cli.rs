//! End-to-end tests of the `companion` program.
