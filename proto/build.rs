//! Compiles `gantry.proto` into Rust with protox (a pure-Rust protobuf
//! compiler), so building Gantry needs no `protoc` on the machine.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=gantry.proto");
    let descriptors = protox::compile(["gantry.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // BTreeMap, not HashMap: labels and env compare and print in one
        // order, and the controller's model uses BTreeMap too.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
