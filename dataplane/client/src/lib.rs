//! CNSE v1 clients: blocking client and the io_uring load generator of cnse-dp
