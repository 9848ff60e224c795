//! The OCI runtime (filled in by the runtime work).
