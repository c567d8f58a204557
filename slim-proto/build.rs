//! Generates the prost types from `proto/` with protox, so no `protoc` binary is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto_dir}");
    let fds = protox::compile(["dataplane/v1/data_plane.proto"], [proto_dir])?;
    prost_build::Config::new()
        .bytes(["."])
        // Sorted maps: encoding (and so every output of a core) does not depend on hash order.
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
