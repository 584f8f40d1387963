//! Latency histograms, tables and CSV for cnse-dp
