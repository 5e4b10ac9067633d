//! `handshake-flood`: replays one valid handshake initiation (with the target's cookie once it
//! has sent one) at a fixed rate against a WireGuard device, and prints what it sent. See
//! `wgmesh_tests::flood`. Prints one line when the timed flood begins, and the report at
//! the end.
//!
//! Usage: handshake-flood --target IP:PORT --peer-public-key BASE64 [--rate PER_SECOND]
//! [--seconds N] [--source IP]

use anyhow::{Context, Result, bail};
use base64::Engine;
use std::time::Duration;
use wgmesh_tests::bench::arg;
use wgmesh_tests::flood::{self, FloodConfig};

const USAGE: &str = "handshake-flood --target IP:PORT --peer-public-key BASE64 \
                     [--rate PER_SECOND (50000)] [--seconds N (10)] [--source IP]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let target = arg(&args, "--target")
        .context(USAGE)?
        .parse()
        .context("--target must be IP:PORT")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(arg(&args, "--peer-public-key").context(USAGE)?.trim())
        .context("--peer-public-key is not base64")?;
    let Ok(peer_public_key) = <[u8; 32]>::try_from(key) else {
        bail!("--peer-public-key is not 32 bytes");
    };
    let rate = arg(&args, "--rate").map_or(Ok(50_000), |v| v.parse())?;
    let seconds = arg(&args, "--seconds").map_or(Ok(10), |v| v.parse())?;
    let source = arg(&args, "--source")
        .map(|v| v.parse())
        .transpose()
        .context("--source must be an IP address")?;
    let config = FloodConfig {
        target,
        peer_public_key,
        rate,
        duration: Duration::from_secs(seconds),
        source,
    };
    let report = flood::run(&config, |primed| {
        // One line when the timed flood begins, so a caller can wait for it.
        println!(
            "flooding {target} at {rate}/s for {seconds} s ({})",
            if primed.had_cookie {
                "with a cookie"
            } else {
                "no cookie came"
            }
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    println!("{report}");
    Ok(())
}
