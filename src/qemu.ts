// Placeholder: filled in by the work on qemu.
export {}
