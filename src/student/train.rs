//! Training students from a cache (work in progress).
