//! Placeholder: filled in by the container work.
