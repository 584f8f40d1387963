//! Content-addressed model store of cnse-dp
