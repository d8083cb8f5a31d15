// Placeholder: filled in by the work on tapfdsource.
export {}
