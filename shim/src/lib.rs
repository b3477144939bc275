//! Test support: see tests/ for the test binaries.
