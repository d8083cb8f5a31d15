// Placeholder: filled in by the work on state.
export {}
