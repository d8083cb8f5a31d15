// Placeholder: filled in by the work on fdsource.
export {}
