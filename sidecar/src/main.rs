//! The `mend` binary: all roles in one executable.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mend::cli::main().await
}
