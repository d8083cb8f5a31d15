//! Placeholder: filled in by the unix work.
