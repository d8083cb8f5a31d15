// Placeholder: filled in by the work on payloads.
export {}
