//! llama.cpp llama-server backend of cnse-dp: HTTP/1.1 streaming on the core's io_uring
