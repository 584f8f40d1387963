//! Synthetic backend (written next).
