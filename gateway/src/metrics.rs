//! Prometheus counters and histograms, rendered as text.
