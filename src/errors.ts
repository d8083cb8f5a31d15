// Placeholder: filled in by the work on errors.
export {}
