//! Links the `gantry` binary as a position-dependent executable.
//!
//! Why: `gantry runtime run` is latency-bound and most of a small binary
//! start is the dynamic loader applying ~19,000 relative relocations to a
//! PIE and the copy-on-write faults they cause; a non-PIE executable has
//! none (measured: 0.35-0.45 ms less CPU per start). The code itself stays
//! position-independent (no RUSTFLAGS change, so no dependency rebuilds),
//! only the final link is fixed-address. The cost is that the binary's own
//! image is not address-randomised (libraries, heap and stack still are).

fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
