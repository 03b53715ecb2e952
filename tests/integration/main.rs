//! Integration tests (as root, against the real kernel).
