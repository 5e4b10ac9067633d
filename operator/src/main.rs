//! The `wgmesh-operator` binary: parse arguments, set up logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = wgmesh_operator::Args::parse();
    wgmesh_operator::init_logging(args.log_json);
    wgmesh_operator::run(args).await
}
