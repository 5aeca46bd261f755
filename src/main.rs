//! The `keygate` binary: everything lives in the library; see [`keygate::cli`].

/// mimalloc, built without transparent huge pages (`no_thp` in Cargo.toml: resident memory in
/// 4 KiB pages, not whole 2 MiB regions).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
