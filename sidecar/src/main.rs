//! The `mend` binary: all roles in one executable.

/// mimalloc: the processor and sidecar allocate and free many short-lived buffers per message
/// (JSON values, headers, publish frames); glibc's allocator spent a fifth of the processor's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mend::cli::main().await
}
