// Placeholder: filled in by the work on protocol.
export {}
