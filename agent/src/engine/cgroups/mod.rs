//! Control groups (filled in by the cgroups work).
