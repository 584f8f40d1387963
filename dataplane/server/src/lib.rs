//! Thread-per-core io_uring event loop of cnse-dp
