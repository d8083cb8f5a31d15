// Placeholder: filled in by the CNI work.
export {}
