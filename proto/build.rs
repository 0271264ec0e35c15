//! Compiles the .proto files with protox (pure Rust), so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/custody/v1/event.proto",
        "proto/custody/v1/tunnel.proto",
        "proto/custody/v1/ledger.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".custody.ledger.v1.AppendRequest.events")
        .bytes(".custody.ledger.v1.AppendGroup.events")
        .bytes(".custody.ledger.v1.FileChunk.data")
        .bytes(".custody.ledger.v1.LeaseCommand.abandon_events")
        .bytes(".custody.ledger.v1.AbandonCommand.events")
        .compile_fds(fds)?;
    Ok(())
}
