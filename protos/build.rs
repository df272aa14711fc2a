//! Compiles the .proto files with protox (no `protoc` needed) and writes the descriptor set
//! that server reflection serves. The Sparkplug B payload compiles on its own: messages only.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ferrotwin/v1/twin.proto",
        "proto/ferrotwin/v1/replication.proto",
        "proto/ferrotwin/store/v1/store.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ferrotwin_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Our codec: a request that does not decode is INVALID_ARGUMENT (prost's says INTERNAL).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(fds)?;

    // Sparkplug B: messages only, kept out of the reflection descriptor (it is a wire
    // format of the MQTT adapters and the simulator, not part of our API).
    let sparkplug = "proto/sparkplug_b/sparkplug_b.proto";
    println!("cargo:rerun-if-changed={sparkplug}");
    let fds = protox::compile([sparkplug], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
