// Placeholder: filled in by the work on client.
export {}
