//! `fleetctl`: a fleetctl-compatible CLI that talks only to fleet-broker's sockets.

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetctl: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(fleet_broker::cli::run(std::env::args_os().collect()));
    // A session may leave a blocking read of stdin behind; do not wait for it.
    rt.shutdown_background();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
