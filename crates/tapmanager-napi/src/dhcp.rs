//! Placeholder: filled in by the dhcp work.
