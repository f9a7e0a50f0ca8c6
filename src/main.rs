//! The `credbroker` command. `cli::local` holds what runs on this machine against a store folder
//! (`dev`, `init`, `serve`, offline key and audit tools, `bench`); `cli::remote` holds the admin
//! and agent commands that talk to a running daemon over mTLS. `dev` (a local broker with a
//! throwaway PKI) and `bench` (the load benchmark and its Echo baseline) live in this crate
//! only: the daemon library, crates/credbroker, carries neither.

mod bench;
mod cli;
mod dev;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.log_format);
    credbroker::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("credbroker: {:?}: {}", status.code(), status.message()),
                None => eprintln!("credbroker: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}
