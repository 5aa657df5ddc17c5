//! The `logitcache` binary: parses flags, runs the library, prints errors.

use clap::Parser;

fn main() {
    let args = logitcache::cli::Cli::parse();
    logitcache::cli::init_tracing(args.quiet);
    match logitcache::cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                std::process::exit(0);
            }
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
