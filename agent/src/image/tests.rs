//! Store-level tests (filled in below).
