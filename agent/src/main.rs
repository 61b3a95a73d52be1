use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // A container's log shim is this binary too (one file to install).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(netagent::runtime::logs::SHIM_FLAG) {
        return netagent::runtime::logs::shim_main(&argv[2..]);
    }
    let args = netagent::agent::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            // hickory logs every answer at info: far too much for a resolver per container.
            "info,hickory_server=warn,hickory_proto=warn",
        )
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        // One JSON object per line (journald, Loki, ...): fields stay fields.
        netagent::agent::LogFormat::Json => logs.json().flatten_event(true).init(),
        netagent::agent::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netagent: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(netagent::agent::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netagent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
