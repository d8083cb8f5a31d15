//! Placeholder: filled in by the isolation work.
