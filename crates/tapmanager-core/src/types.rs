//! Placeholder: filled in by the types work.
