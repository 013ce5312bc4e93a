//! The `mend` binary: all roles in one executable.

/// mimalloc: every message allocates and frees many short-lived buffers (JSON values, headers,
/// publish frames); glibc's allocator took about a fifth of the processor's CPU. Built without
/// transparent huge pages (`no_thp`), which otherwise raised the sidecar's peak RSS by ~14 MiB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mend::cli::main().await
}
