//! Placeholder: filled in by the netns work.
