// Placeholder: filled in by the work on server.
export {}
