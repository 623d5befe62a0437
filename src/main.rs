//! The `mirrorfs` binary; everything lives in the library's `cli` module.

fn main() {
    let env = env_logger::Env::default().filter_or("MIRRORFS_LOG", "info,fuser=error");
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .init();
    std::process::exit(mirrorfs::cli::main());
}
