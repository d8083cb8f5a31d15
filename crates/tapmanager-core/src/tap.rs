//! Placeholder: filled in by the tap work.
